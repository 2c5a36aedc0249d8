/* fastbp's own worker threads, for one compiled call at a time.
 *
 * A training step on two threads can be faster when fastbp splits its products
 * itself than when BLAS splits them: the forward-product kernel of _smallgemm.h
 * runs on one thread, and OpenBLAS's idle workers spin for a while after every
 * multithreaded call, taking the core another pool of threads would need (a
 * step with both measured bimodal, 759 or 1,125 us). So for the calls where it
 * pays (fbp_pool_takes and fbp_threads_enter in _smallgemm.h), fastbp sets its
 * BLAS to one thread for the call and splits every product across this pool
 * instead, as scikit-learn limits BLAS around its own OpenMP loops. One level of
 * parallelism at a time, and no more threads than BLAS was allowed.
 *
 * The pool: up to FBP_POOL_MAX - 1 workers, started on first use, each spinning
 * for up to a millisecond after its last job and then sleeping on a futex. A job
 * is fn(arg, part, parts) for every part; the caller runs parts too, and any part
 * no worker has claimed, so a late worker only costs time. Parts are claimed through one
 * 64-bit ticket (the job's number, its part count and the next part), so that a
 * worker waking late can never run a part of a job that has ended.
 *
 * One call holds the pool at a time (fbp_pool_begin fails for a second caller,
 * which runs on its own thread); fbp_pool_held is thread-local, so calls on other
 * Python threads never see it. After fork() the child has none of the workers:
 * pthread_atfork resets the pool, which restarts them on its next use (OpenMP's
 * libgomp hangs there instead, which ruled it out). A child forked while another
 * thread of the parent was inside such a call keeps BLAS's count of one thread
 * (setting it from the fork handler could start OpenBLAS's threads there).
 *
 * Linux only (futex); elsewhere fbp_pool_begin returns 0 and callers run alone.
 */
#ifndef FASTBP_POOL_H
#define FASTBP_POOL_H

#define FBP_POOL_MAX 64

typedef void (*fbp_part_fn)(void *arg, int part, int parts);

#if defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* How long an idle worker spins before it sleeps: long enough to bridge the
 * Python between two steps and the gather of an epoch's next batch. Waking a
 * sleeper is slow on a virtual machine (its idle CPU halts): with 50 us, a
 * compiled epoch's worker slept before every batch and the epoch ran 0.72-0.84x
 * the speed of BLAS's own threads; with 1 ms it never sleeps in an epoch.
 * (OpenBLAS's workers spin for about 0.1 s.) */
#define FBP_POOL_SPIN_NS 1000000

/* threads in all (the caller's included) while this thread holds the pool; else 0 */
static __thread int fbp_pool_held = 0;

static struct {
    /* job number << 32 | part count << 16 | next part to claim */
    uint64_t ticket;
    /* the job's number, for sleepers (a futex is 32 bits) */
    uint32_t seq;
    int done;     /* parts finished */
    int sleepers; /* workers asleep or about to be */
    int locked;   /* a call holds the pool */
    int started;  /* workers running */
    fbp_part_fn fn;
    void *arg;
} fbp_pool;

static inline void fbp_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline uint64_t fbp_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Claim and run parts of job `seq` while any are left; returns when none is. */
static void fbp_pool_work(uint32_t seq)
{
    for (;;) {
        uint64_t t = __atomic_load_n(&fbp_pool.ticket, __ATOMIC_ACQUIRE);
        int parts = (int)((t >> 16) & 0xffff), part = (int)(t & 0xffff);
        if ((uint32_t)(t >> 32) != seq || part >= parts)
            return;
        if (!__atomic_compare_exchange_n(&fbp_pool.ticket, &t, t + 1, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            continue;
        /* the job cannot end (nor fn and arg change) before this part is done */
        fbp_pool.fn(fbp_pool.arg, part, parts);
        __atomic_add_fetch(&fbp_pool.done, 1, __ATOMIC_RELEASE);
    }
}

/* seen0: the job number when the worker was started, before the job that started
 * it (read here instead, by a worker starting late, it was that job's number: the
 * worker took it for done and its caller ran every part alone). */
static void *fbp_pool_worker(void *seen0)
{
    uint32_t seen = (uint32_t)(uintptr_t)seen0;
    for (;;) {
        uint64_t since = fbp_now_ns();
        uint32_t seq;
        int spins = 0;
        while ((seq = __atomic_load_n(&fbp_pool.seq, __ATOMIC_ACQUIRE)) == seen) {
            fbp_cpu_relax();
            if (++spins % 64 == 0 && fbp_now_ns() - since > FBP_POOL_SPIN_NS) {
                __atomic_add_fetch(&fbp_pool.sleepers, 1, __ATOMIC_SEQ_CST);
                if (__atomic_load_n(&fbp_pool.seq, __ATOMIC_SEQ_CST) == seen)
                    syscall(SYS_futex, &fbp_pool.seq, FUTEX_WAIT_PRIVATE, seen, NULL, NULL,
                            0);
                __atomic_sub_fetch(&fbp_pool.sleepers, 1, __ATOMIC_SEQ_CST);
                since = fbp_now_ns();
            }
        }
        seen = seq;
        fbp_pool_work(seq);
    }
    return NULL;
}

/* In a child after fork(): no worker exists there. A call that held the pool in
 * another thread of the parent does not exist either. */
static void fbp_pool_after_fork(void)
{
    fbp_pool.started = 0;
    fbp_pool.locked = 0;
    fbp_pool.sleepers = 0;
    fbp_pool_held = 0;
}

/* Start workers up to `threads` in all (the caller's thread counted); 0 if none
 * could be started (the caller then runs alone). Called by the pool's holder. */
static int fbp_pool_start(int threads)
{
    static int atfork = 0;
    if (!atfork) {
        if (pthread_atfork(NULL, NULL, fbp_pool_after_fork) != 0)
            return 0;
        atfork = 1;
    }
    while (fbp_pool.started < threads - 1) {
        pthread_t th;
        pthread_attr_t attr;
        int failed;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        failed = pthread_create(&th, &attr, fbp_pool_worker, (void *)(uintptr_t)fbp_pool.seq);
        pthread_attr_destroy(&attr);
        if (failed)
            break;
        fbp_pool.started++;
    }
    return fbp_pool.started > 0;
}

/* Take the pool for this call with `threads` threads in all (2 <= threads, at most
 * FBP_POOL_MAX): 1 if taken (fbp_pool_end gives it back), 0 if another call holds
 * it or no worker could start. */
static int fbp_pool_begin(int threads)
{
    int free_ = 0;
    if (threads < 2 || fbp_pool_held)
        return 0;
    if (threads > FBP_POOL_MAX)
        threads = FBP_POOL_MAX;
    if (!__atomic_compare_exchange_n(&fbp_pool.locked, &free_, 1, 0, __ATOMIC_ACQUIRE,
                                     __ATOMIC_RELAXED))
        return 0;
    if (!fbp_pool_start(threads)) {
        __atomic_store_n(&fbp_pool.locked, 0, __ATOMIC_RELEASE);
        return 0;
    }
    fbp_pool_held = threads < fbp_pool.started + 1 ? threads : fbp_pool.started + 1;
    return 1;
}

static void fbp_pool_end(void)
{
    if (!fbp_pool_held)
        return;
    fbp_pool_held = 0;
    __atomic_store_n(&fbp_pool.locked, 0, __ATOMIC_RELEASE);
}

/* fn(arg, part, parts) for part = 0 .. parts - 1, across the pool; returns when all
 * are done. Only by the pool's holder, with 1 <= parts <= 0xffff. */
static void fbp_pool_run(fbp_part_fn fn, void *arg, int parts)
{
    uint32_t seq = fbp_pool.seq + 1;
    fbp_pool.fn = fn;
    fbp_pool.arg = arg;
    fbp_pool.done = 0;
    __atomic_store_n(&fbp_pool.ticket, (uint64_t)seq << 32 | (uint64_t)parts << 16,
                     __ATOMIC_RELEASE);
    __atomic_store_n(&fbp_pool.seq, seq, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&fbp_pool.sleepers, __ATOMIC_SEQ_CST))
        syscall(SYS_futex, &fbp_pool.seq, FUTEX_WAKE_PRIVATE, FBP_POOL_MAX, NULL, NULL, 0);
    fbp_pool_work(seq);
    /* a worker still on its part: spin, yielding now and then (more threads than
     * cores can leave it waiting for this one's) */
    for (unsigned spins = 1; __atomic_load_n(&fbp_pool.done, __ATOMIC_ACQUIRE) < parts;
         spins++) {
        fbp_cpu_relax();
        if (spins % 4096 == 0)
            sched_yield();
    }
}

#else /* no pool: every call runs on its caller's thread */

static const int fbp_pool_held = 0;
static int fbp_pool_begin(int threads) { (void)threads; return 0; }
static void fbp_pool_end(void) {}
static void fbp_pool_run(fbp_part_fn fn, void *arg, int parts)
{
    for (int part = 0; part < parts; part++)
        fn(arg, part, parts);
}

#endif
#endif
