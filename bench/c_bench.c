/* C counterpart of `switchyard bench` (noop workload): prints one JSON line
 * on stdout, progress on stderr.
 *
 *   c_bench [--store sqlite|memory|URL] [--steps N] [--concurrency C]
 *           [--batch B] [--trials T]
 *
 * Defaults: 100000 steps, concurrency 512 (as `switchyard bench`), batches
 * of 1000, 200 latency trials.
 *
 * Built and run by `bench/run --lang c ...`. Two phases, as in the Rust and
 * Python benchmarks:
 *
 * 1. Throughput: N tasks are spawned with sy_client_spawn_many in batches of
 *    B while one worker runs a no-op C callback C at a time; the clock runs
 *    from the first spawn until the callback has counted N runs and the
 *    store confirms N more completed steps.
 * 2. Latency: T single tasks one after another on the idle worker, from the
 *    start of the spawn call to the start of the callback. */
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "switchyard.h"

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void progress(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void die(const char *what, sy_status st, sy_error *err) {
    fprintf(stderr, "c_bench: %s: %s: %s\n", what, sy_status_name(st), sy_error_message(err));
    exit(1);
}

static long counted = 0, target = 0;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static double *started; /* latency trial i: when its callback started */

static int32_t noop(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)input, (void)len, (void)ctx, (void)ud;
    if (__atomic_add_fetch(&counted, 1, __ATOMIC_SEQ_CST) == target) {
        pthread_mutex_lock(&mu);
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
    }
    return SY_OK;
}

static int32_t latency(const char *input, size_t len, sy_ctx *ctx, void *ud) {
    (void)len, (void)ctx, (void)ud;
    double t = now_s();
    const char *p = strstr(input, "\"i\":");
    long i = p ? strtol(p + 4, NULL, 10) : 0;
    pthread_mutex_lock(&mu);
    started[i] = t;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    return SY_OK;
}

static long completed(sy_client *client) {
    sy_buf counts = {0};
    sy_error *err = NULL;
    sy_status st = sy_client_count_steps(client, &counts, &err);
    if (st != SY_OK) die("count_steps", st, err);
    const char *p = strstr((const char *)counts.ptr, "\"completed\":");
    long n = p ? strtol(p + 12, NULL, 10) : 0;
    sy_buf_free(&counts);
    return n;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double percentile_ms(double *s, int n, double p) {
    if (n == 0) return 0;
    qsort(s, (size_t)n, sizeof *s, cmp);
    int i = (int)(p / 100.0 * (n - 1) + 0.5);
    return s[i] * 1000.0;
}

int main(int argc, char **argv) {
    const char *store_arg = "sqlite";
    /* --concurrency defaults to 512, as in `switchyard bench` (rust) and the
     * node bench: with 256, the host claims and records half as many steps
     * per store transaction, so a C/Rust comparison of the defaults measured
     * SQLite transaction counts (about 1.2-1.5x as many fsyncs) as much as
     * the binding. */
    long steps = 100000, concurrency = 512, batch = 1000, trials = 200;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) {
            fprintf(stderr, "c_bench: %s needs a value\n", a);
            return 2;
        }
        if (!strcmp(a, "--store")) store_arg = v;
        else if (!strcmp(a, "--steps")) steps = atol(v);
        else if (!strcmp(a, "--concurrency")) concurrency = atol(v);
        else if (!strcmp(a, "--batch")) batch = atol(v);
        else if (!strcmp(a, "--trials")) trials = atol(v);
        else {
            fprintf(stderr, "c_bench: unknown option %s (expected --store, --steps, --concurrency, --batch, --trials)\n", a);
            return 2;
        }
        i++;
    }
    if (steps < 1 || concurrency < 1 || batch < 1 || trials < 1) {
        fprintf(stderr, "c_bench: --steps, --concurrency, --batch and --trials must be at least 1\n");
        return 2;
    }
    char url[512], dir[] = "/tmp/switchyard-bench-XXXXXX";
    int temp = !strcmp(store_arg, "sqlite");
    if (temp) {
        if (!mkdtemp(dir)) return perror("mkdtemp"), 1;
        snprintf(url, sizeof url, "sqlite:%s/bench.db", dir);
    } else if (!strcmp(store_arg, "postgres")) {
        fprintf(stderr, "c_bench: give a postgres:// URL (the C benchmark does not start a server)\n");
        return 2;
    } else {
        snprintf(url, sizeof url, "%s", store_arg);
    }
    char kind[32];
    snprintf(kind, sizeof kind, "%.*s", (int)strcspn(url, ":"), url);
    char tp_name[64], lat_name[64];
    snprintf(tp_name, sizeof tp_name, "bench.%d.noop", (int)getpid());
    snprintf(lat_name, sizeof lat_name, "bench.%d.latency", (int)getpid());
    started = calloc((size_t)trials, sizeof *started);
    target = steps;

    sy_error *err = NULL;
    sy_store *store = NULL;
    sy_client *client = NULL;
    sy_worker *worker = NULL;
    sy_status st;
    if ((st = sy_store_open(url, &store, &err))) die("open", st, err);
    if ((st = sy_client_new(store, &client, &err))) die("client", st, err);
    if ((st = sy_worker_new(store, (size_t)concurrency + 8, &worker, &err))) die("worker", st, err);
    sy_handler_options o = sy_handler_options_default();
    o.concurrency = (size_t)concurrency;
    if ((st = sy_worker_step(worker, tp_name, &o, noop, NULL, &err))) die("step", st, err);
    o.concurrency = 8;
    if ((st = sy_worker_step(worker, lat_name, &o, latency, NULL, &err))) die("step", st, err);
    if ((st = sy_worker_start(worker, &err))) die("start", st, err);

    long base = completed(client);
    progress("throughput: %ld steps, C callback, store %s", steps, kind);
    size_t each = strlen(tp_name) + 32;
    char *tasks = malloc((size_t)batch * each + 8);
    double t0 = now_s();
    for (long start = 0; start < steps; start += batch) {
        long n = steps - start < batch ? steps - start : batch;
        size_t off = 0;
        tasks[off++] = '[';
        for (long i = 0; i < n; i++)
            off += (size_t)sprintf(tasks + off, "%s{\"handler\":\"%s\",\"input\":null}", i ? "," : "", tp_name);
        tasks[off++] = ']';
        tasks[off] = 0;
        sy_buf ids = {0};
        if ((st = sy_client_spawn_many(client, tasks, &ids, &err))) die("spawn_many", st, err);
        sy_buf_free(&ids);
    }
    free(tasks);
    pthread_mutex_lock(&mu);
    while (__atomic_load_n(&counted, __ATOMIC_SEQ_CST) < steps) {
        struct timespec dl;
        clock_gettime(CLOCK_REALTIME, &dl);
        dl.tv_sec += 1;
        pthread_cond_timedwait(&cv, &mu, &dl);
        if (now_s() - t0 > 600) {
            fprintf(stderr, "c_bench: only %ld of %ld steps ran\n", counted, steps);
            return 1;
        }
    }
    pthread_mutex_unlock(&mu);
    while (completed(client) - base < steps) nanosleep(&(struct timespec){0, 5000000L}, NULL);
    double seconds = now_s() - t0;

    progress("latency: %ld trials on an idle host", trials);
    double *samples = calloc((size_t)trials, sizeof *samples);
    for (long i = 0; i < trials; i++) {
        char input[64];
        snprintf(input, sizeof input, "{\"i\":%ld}", i);
        sy_buf id = {0}, res = {0};
        double t = now_s();
        if ((st = sy_client_spawn(client, lat_name, input, &id, &err))) die("spawn", st, err);
        pthread_mutex_lock(&mu);
        while (started[i] == 0) pthread_cond_wait(&cv, &mu);
        samples[i] = started[i] - t;
        pthread_mutex_unlock(&mu);
        if ((st = sy_client_result(client, (const char *)id.ptr, 30000, &res, &err))) die("result", st, err);
        sy_buf_free(&id);
        sy_buf_free(&res);
    }
    sy_worker_free(worker);
    sy_client_free(client);
    sy_store_free(store);
    if (temp) {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
        if (system(cmd) != 0) return 1;
    }
    double p50 = percentile_ms(samples, (int)trials, 50), p99 = percentile_ms(samples, (int)trials, 99);
    printf("{\"lang\":\"c\",\"store\":\"%s\",\"workload\":\"noop\",\"steps\":%ld,\"concurrency\":%ld,"
           "\"batch\":%ld,\"seconds\":%.3f,\"steps_per_sec\":%.0f,\"trials\":%ld,\"p50_ms\":%.3f,\"p99_ms\":%.3f}\n",
           kind, steps, concurrency, batch, seconds, (double)steps / seconds, trials, p50, p99);
    free(samples);
    free(started);
    return 0;
}
