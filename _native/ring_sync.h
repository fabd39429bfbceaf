/* A mutex and condition variable that work without the GIL on both platforms. */
#ifndef OISP_RING_SYNC_H
#define OISP_RING_SYNC_H

#ifdef _WIN32
#include <windows.h>
typedef struct { SRWLOCK lock; CONDITION_VARIABLE cond; } oisp_sync;
static void oisp_sync_init(oisp_sync *s) { InitializeSRWLock(&s->lock); InitializeConditionVariable(&s->cond); }
static void oisp_sync_destroy(oisp_sync *s) { (void)s; }
static void oisp_lock(oisp_sync *s) { AcquireSRWLockExclusive(&s->lock); }
static void oisp_unlock(oisp_sync *s) { ReleaseSRWLockExclusive(&s->lock); }
static void oisp_broadcast(oisp_sync *s) { WakeAllConditionVariable(&s->cond); }
/* Wait up to ms milliseconds (ms < 0: forever); the lock is held on entry and exit. */
static void oisp_wait(oisp_sync *s, int ms)
{
    SleepConditionVariableSRW(&s->cond, &s->lock, ms < 0 ? INFINITE : (DWORD)ms, 0);
}
#else
#include <pthread.h>
#include <time.h>
typedef struct { pthread_mutex_t lock; pthread_cond_t cond; } oisp_sync;
static void oisp_sync_init(oisp_sync *s)
{
    pthread_condattr_t attr;
    pthread_mutex_init(&s->lock, NULL);
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cond, &attr);
    pthread_condattr_destroy(&attr);
}
static void oisp_sync_destroy(oisp_sync *s) { pthread_cond_destroy(&s->cond); pthread_mutex_destroy(&s->lock); }
static void oisp_lock(oisp_sync *s) { pthread_mutex_lock(&s->lock); }
static void oisp_unlock(oisp_sync *s) { pthread_mutex_unlock(&s->lock); }
static void oisp_broadcast(oisp_sync *s) { pthread_cond_broadcast(&s->cond); }
static void oisp_wait(oisp_sync *s, int ms)
{
    struct timespec deadline;
    if (ms < 0) {
        pthread_cond_wait(&s->cond, &s->lock);
        return;
    }
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += ms / 1000;
    deadline.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec += 1;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&s->cond, &s->lock, &deadline);
}
#endif

#endif
