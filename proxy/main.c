/*
 * main.c — argv, signals, loop start and exit codes; nothing else.
 *
 *   pgdual -c FILE [-p PORT]     run the proxy
 *   pgdual -c FILE --check       validate the config, print every error, exit 0 or 1
 *   pgdual --demo [-p PORT]      throwaway old/new clusters, sample rules, proxy to them
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "proxy/demo.h"
#include "proxy/log.h"
#include "proxy/notify.h"
#include "proxy/server.h"
#include "rules/flags.h"

static void usage(FILE *out)
{
    fprintf(out, "pgdual " PD_VERSION " - PostgreSQL proxy for zero-downtime migrations\n"
                 "\n"
                 "Usage:\n"
                 "  pgdual -c FILE [-p PORT]   run with the config FILE\n"
                 "  pgdual -c FILE --check     validate FILE and exit (0: valid)\n"
                 "  pgdual --demo [-p PORT]    start throwaway old/new PostgreSQL clusters\n"
                 "                             with sample rules and proxy to them\n"
                 "  pgdual --version | --help\n"
                 "\n"
                 "Signals: SIGHUP reloads the config; SIGTERM stops accepting, ends sessions at\n"
                 "their next transaction boundary (the rest after limits.shutdown_grace_ms)\n"
                 "and exits; SIGINT ends every session and exits.\n");
}

static pd_config_t *load_config(const char *path)
{
    pd_config_errors_t errs = {0};
    pd_config_t *cfg = pd_config_load(path, &errs);
    for (size_t i = 0; i < errs.count; i++)
        fprintf(stderr, "pgdual: %s\n", errs.msgs[i]);
    pd_config_errors_free(&errs);
    return cfg;
}

/*
 * --check also opens the users file and applies the server's checks of the rules' initial
 * flags, since a bad users file or flags the server cannot serve would stop it too.
 */
static int check_config(const char *path)
{
    pd_config_t *cfg = load_config(path);
    if (cfg == NULL) {
        fprintf(stderr, "pgdual: configuration file \"%s\" has errors\n", path);
        return 1;
    }
    int rc = 0;
    pd_config_errors_t ferrs = {0};
    if (pd_flags_check_config(cfg, &ferrs) > 0) {
        for (size_t i = 0; i < ferrs.count; i++)
            fprintf(stderr, "pgdual: %s\n", ferrs.msgs[i]);
        fprintf(stderr, "pgdual: HINT:  Change the rules' initial writes/reads in the file: "
                        "pgdual refuses to start with flags it cannot serve.\n");
        rc = 1;
    }
    pd_config_errors_free(&ferrs);
    if (cfg->users_file != NULL) {
        pd_config_errors_t errs = {0};
        pd_users_t *users = pd_users_load(cfg->users_file, &errs);
        for (size_t i = 0; i < errs.count; i++)
            fprintf(stderr, "pgdual: %s\n", errs.msgs[i]);
        pd_config_errors_free(&errs);
        if (users == NULL)
            rc = 1;
        pd_users_free(users);
    }
    if (rc != 0)
        fprintf(stderr, "pgdual: configuration file \"%s\" has errors\n", path);
    else
        printf("pgdual: configuration file \"%s\" is valid (%u databases, %u rules)\n", path,
               cfg->database_count, cfg->rule_count);
    pd_config_free(cfg);
    return rc;
}

static int run(pd_config_t *cfg, pd_demo_t *demo, pd_notify_t *notify)
{
    uv_loop_t loop;
    if (uv_loop_init(&loop) != 0) {
        pd_config_free(cfg);
        return 1;
    }
    pd_server_t srv;
    int rc = 1;
    if (pd_server_init(&srv, &loop, cfg) == 0) {
        if (demo != NULL)
            pd_demo_print_banner(demo);
        srv.notify = notify;
        rc = pd_server_run(&srv);
    }
    pd_server_free(&srv);
    /* Run once more so that every close callback has fired before the loop goes. */
    uv_run(&loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&loop) != 0)
        pd_log_warning(NULL, "event loop closed with handles still open");
    return rc;
}

int main(int argc, char **argv)
{
    static const struct option options[] = {
        {"config", required_argument, NULL, 'c'},
        {"check", no_argument, NULL, 'k'},
        {"demo", no_argument, NULL, 'd'},
        {"port", required_argument, NULL, 'p'},
        {"version", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *config = NULL;
    bool check = false, demo_mode = false;
    long port = 0;
    int opt;
    while ((opt = getopt_long(argc, argv, "c:p:hV", options, NULL)) != -1) {
        switch (opt) {
        case 'c':
            config = optarg;
            break;
        case 'k':
            check = true;
            break;
        case 'd':
            demo_mode = true;
            break;
        case 'p': {
            char *end;
            port = strtol(optarg, &end, 10);
            if (*end != '\0' || port < 1 || port > 65535) {
                fprintf(stderr, "pgdual: invalid port \"%s\": expected 1 to 65535\n", optarg);
                return 2;
            }
            break;
        }
        case 'V':
            printf("pgdual " PD_VERSION "\n");
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind < argc || (config == NULL) == !demo_mode || (check && demo_mode)) {
        if (optind < argc)
            fprintf(stderr, "pgdual: unexpected argument \"%s\"\n", argv[optind]);
        else
            fprintf(stderr, "pgdual: give either -c FILE or --demo\n");
        usage(stderr);
        return 2;
    }
    if (check)
        return check_config(config);

    /* A peer that goes away must be an error to handle, not a signal that kills us. */
    signal(SIGPIPE, SIG_IGN);

    /* Before the demo starts its servers, which must not report in pgdual's name. */
    pd_notify_t *notify = pd_notify_open();
    pd_demo_t *demo = NULL;
    if (demo_mode) {
        demo = pd_demo_start(port ? (int)port : 6432);
        if (demo == NULL) {
            pd_notify_close(notify);
            return 1;
        }
        config = pd_demo_config_path(demo);
    }
    pd_config_t *cfg = load_config(config);
    int rc = 1;
    if (cfg != NULL) {
        if (port != 0)
            cfg->listen_port = (uint16_t)port;
        rc = run(cfg, demo, notify);
    }
    if (demo != NULL)
        pd_demo_stop(demo);
    pd_notify_close(notify);
    return rc;
}
