/*
 * demo.h — `pgdual --demo`: throwaway local old/new PostgreSQL clusters with a sample
 * schema and sample rules, so that a newcomer sees pgdual work with one command.
 *
 * The clusters are created with initdb as the `postgres` user (initdb refuses root) in
 * a fresh temporary directory, listen on loopback at free high ports, and are stopped by
 * PID and removed by pd_demo_stop.
 */
#ifndef PD_PROXY_DEMO_H
#define PD_PROXY_DEMO_H

typedef struct pd_demo pd_demo_t;

/*
 * Creates and starts the two clusters, loads the sample schemas (database `app` on old for
 * the expand/contract story; database `shop` on both, rows on old, for blue/green), and
 * writes a config file (proxy on 127.0.0.1:listen_port, admin socket in the temp dir, a
 * sample rule per story) into the temp dir. Prints progress lines to stderr. Returns NULL
 * after printing what failed and what to do (and cleaning up whatever was started).
 */
pd_demo_t *pd_demo_start(int listen_port);

/* Path of the config file written by pd_demo_start. */
const char *pd_demo_config_path(const pd_demo_t *demo);

/* Prints to stdout how to connect with psql and pgdualctl, and that Ctrl-C stops. */
void pd_demo_print_banner(const pd_demo_t *demo);

/* Stops both clusters (by PID, fast shutdown), removes the temp dir, frees demo. */
void pd_demo_stop(pd_demo_t *demo);

#endif /* PD_PROXY_DEMO_H */
