/* Holds MIB MiB of anonymous memory and keeps dirtying RATE MiB/s of it
 * (RATE 0: as fast as the CPU allows, a CPU-bound dirtier).
 * Every page holds a version stamp repeated over the page; the versions
 * themselves live in memory too. Writes /ready when filled. Whenever /check
 * appears it verifies every page against its version and writes "ok N" or
 * "bad OFFSET" to /result (the container's memory is consistent or not). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
static uint64_t stamp(uint64_t page, uint64_t version) { return (page << 20) ^ (version * 0x9E3779B97F4A7C15ull); }

static void fill(uint64_t *p, uint64_t page, uint64_t version) {
    uint64_t v = stamp(page, version);
    for (int i = 0; i < PAGE / 8; i++) p[i] = v + i;
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen("/result.tmp", "w");
    if (!f) return;
    fputs(text, f);
    fclose(f);
    rename("/result.tmp", path);
}

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 64;
    double rate = argc > 2 ? atof(argv[2]) : 4.0;
    size_t pages = mib * 256;
    uint8_t *mem = mmap(0, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t *version = calloc(pages, sizeof *version);
    if (mem == MAP_FAILED || !version) return 1;
    for (size_t i = 0; i < pages; i++) fill((uint64_t *)(mem + i * PAGE), i, 0);
    FILE *r = fopen("/ready", "w"); if (r) fclose(r);
    uint64_t rng = 0x1234567;
    double budget = 0, last = now();
    for (;;) {
        double t = now();
        budget += rate > 0 ? (t - last) * rate * 256 : 4096; /* pages allowed */
        last = t;
        while (budget >= 1) {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            size_t i = rng % pages;
            version[i]++;
            fill((uint64_t *)(mem + i * PAGE), i, version[i]);
            budget -= 1;
        }
        if (access("/check", F_OK) == 0) {
            size_t bad = pages;
            for (size_t i = 0; i < pages && bad == pages; i++) {
                uint64_t *p = (uint64_t *)(mem + i * PAGE), v = stamp(i, version[i]);
                for (int k = 0; k < PAGE / 8; k++) if (p[k] != v + k) { bad = i; break; }
            }
            char text[64];
            if (bad == pages) snprintf(text, sizeof text, "ok %zu", mib);
            else snprintf(text, sizeof text, "bad %zu", bad * PAGE);
            unlink("/check");
            write_file("/result", text);
        }
        if (rate > 0) usleep(10000);
    }
}
