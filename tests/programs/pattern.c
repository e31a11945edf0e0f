/* Holds MIB MiB of anonymous memory filled with a known pattern, in a
 * container. Writes /ready when filled. Whenever /check appears, it verifies
 * every byte, writes "ok" or "bad OFFSET" to /result and removes /check.
 * With FORK set it forks first: parent and child each hold their own pattern
 * (different seeds) and answer /check-parent and /check-child. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static uint64_t value(uint64_t i, uint64_t seed) { return (i * 0x9E3779B97F4A7C15ull) ^ seed; }

static void write_file(const char *path, const char *text) {
    char tmp[256];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fputs(text, f);
    fclose(f);
    rename(tmp, path);
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 256;
    const char *role = "";
    uint64_t seed = 0x5EED;
    if (argc > 2 && fork() == 0) { role = "-child"; seed = 0xC41D; }
    else if (argc > 2) role = "-parent";
    size_t n = mib * 1024 * 1024 / 8;
    uint64_t *p = mmap(0, n * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return 1;
    for (size_t i = 0; i < n; i++) p[i] = value(i, seed);
    char ready[64], check[64], result[64];
    snprintf(ready, sizeof ready, "/ready%s", role);
    snprintf(check, sizeof check, "/check%s", role);
    snprintf(result, sizeof result, "/result%s", role);
    write_file(ready, "1");
    for (;;) {
        if (access(check, F_OK) == 0) {
            size_t bad = n;
            for (size_t i = 0; i < n; i++) if (p[i] != value(i, seed)) { bad = i; break; }
            char text[64];
            if (bad == n) snprintf(text, sizeof text, "ok %zu", mib);
            else snprintf(text, sizeof text, "bad %zu", bad * 8);
            unlink(check);
            write_file(result, text);
        }
        usleep(50000);
    }
}
