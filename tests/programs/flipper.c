/* Flips FLIPS pages back and forth between two contents, A and B, at random,
 * thousands of times a second, so that pages change A->B->A between two rounds of a
 * migration: a dirty tracker comparing contents must compare with what was
 * sent, not with what it saw (issue 15). Also holds BALLAST MiB written
 * once, which makes a hash tracker's collect, and so the time between
 * hashing a page and sending it, longer.
 * Every flip page holds a fixed pattern but for its first word, A or B as
 * the page's flip count (kept in memory too, only ever growing) is even or
 * odd. Writes /ready when filled. Whenever /check appears it verifies every
 * page and writes "ok FLIPS" or "bad N of FLIPS, first at OFFSET" to
 * /result (the ballast counts among the bad pages). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static uint64_t stamp(uint64_t page, uint64_t version) { return (page << 20) ^ (version * 0x9E3779B97F4A7C15ull); }

/* The first word of flip page i after `count` flips. */
static uint64_t first_word(uint64_t i, uint64_t count) { return stamp(i, 1 + (count & 1)); }

static void write_file(const char *path, const char *text) {
    FILE *f = fopen("/result.tmp", "w");
    if (!f) return;
    fputs(text, f);
    fclose(f);
    rename("/result.tmp", path);
}

int main(int argc, char **argv) {
    size_t flips = argc > 1 ? strtoul(argv[1], 0, 10) : 256;
    size_t ballast = (argc > 2 ? strtoul(argv[2], 0, 10) : 32) * 256;
    uint64_t *big = mmap(0, ballast * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t *mem = mmap(0, flips * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t *count = calloc(flips, sizeof *count);
    if (big == MAP_FAILED || mem == MAP_FAILED || !count) return 1;
    for (size_t i = 0; i < ballast; i++)
        for (int k = 0; k < WORDS; k++) big[i * WORDS + k] = stamp(i, 0) + k;
    for (size_t i = 0; i < flips; i++) {
        uint64_t *p = mem + i * WORDS;
        for (int k = 0; k < WORDS; k++) p[k] = stamp(i, 0) + k;
        p[0] = first_word(i, 0);
    }
    FILE *r = fopen("/ready", "w"); if (r) fclose(r);
    uint64_t rng = 0x1234567;
    for (;;) {
        for (size_t i = 0; i < flips; i++) {
            if ((i & 63) == 0) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; }
            if (rng >> (i & 63) & 1) {
                /* Toggled, not set: a page the target got wrong stays
                 * wrong until the check, however often it flips. */
                count[i]++;
                mem[i * WORDS] ^= first_word(i, 0) ^ first_word(i, 1);
            }
        }
        if (access("/check", F_OK) == 0) {
            size_t bad = 0, first = 0;
            for (size_t i = 0; i < flips; i++) {
                const uint64_t *p = mem + i * WORDS;
                int ok = p[0] == first_word(i, count[i]);
                for (int k = 1; k < WORDS && ok; k++) ok = p[k] == stamp(i, 0) + k;
                if (!ok && bad++ == 0) first = i;
            }
            for (size_t i = 0; i < ballast; i++)
                for (int k = 0; k < WORDS; k++)
                    if (big[i * WORDS + k] != stamp(i, 0) + k) { bad++; break; }
            char text[96];
            if (bad == 0) snprintf(text, sizeof text, "ok %zu", flips);
            else snprintf(text, sizeof text, "bad %zu of %zu, first at %zu", bad, flips, first * PAGE);
            unlink("/check");
            write_file("/result", text);
        }
        usleep(200);
    }
}
