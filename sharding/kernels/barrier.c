/* The barrier of the shared-memory all-to-all (sharding/shm.py): every rank of one host publishes the
 * generation it reached in a counter of a shared mapping and waits until every counter has reached it.
 *
 * The release store and acquire loads order the payload a rank wrote into its outbox before arriving
 * before whatever a rank reads once it has seen everyone arrive, on any CPU (x86's stores are ordered
 * anyway; ARM's are not). Waiting spins for a few hundred looks, then sleeps 20 us between looks, so
 * that the worker's other threads (gloo's, the data reader's) and other processes have the core (tried:
 * sched_yield between looks, a few percent slower on the 2-worker sharding bench).
 */
#include <stdint.h>
#include <time.h>

#define SPINS_BEFORE_SLEEP 256
#define SLEEP_NS 20000

static double seconds_since(const struct timespec *start) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - start->tv_sec) + 1e-9 * (double)(now.tv_nsec - start->tv_nsec);
}

/* Rank `rank` of `world` arrives at generation `gen` of counters[world] and waits until every counter is
 * at least `gen`. Returns 0, or 1 when `timeout_s` seconds passed first. */
int shm_barrier(int64_t *counters, int64_t world, int64_t rank, int64_t gen, double timeout_s) {
    __atomic_store_n(&counters[rank], gen, __ATOMIC_RELEASE);
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int64_t looks = 0;; looks++) {
        int64_t behind = 0;
        for (int64_t r = 0; r < world; r++) behind += __atomic_load_n(&counters[r], __ATOMIC_ACQUIRE) < gen;
        if (behind == 0) return 0;
        if (looks >= SPINS_BEFORE_SLEEP) {
            const struct timespec pause = {0, SLEEP_NS};
            nanosleep(&pause, NULL);
            if ((looks & 63) == 0 && seconds_since(&start) > timeout_s) return 1;
        }
    }
}
