/*
 * jobs_cmd.h — the admin socket's job commands: `verify`, `backfill`, `jobs`, `cancel`.
 * Each handler takes the command's words (argv[0] is the verb) and returns the JSON
 * reply ({"ok": true, ...} or {"ok": false, "error": ..., "hint": ...}); the caller
 * sends and frees it. They run on the event loop and never wait for a job.
 */
#ifndef PD_ADMIN_JOBS_CMD_H
#define PD_ADMIN_JOBS_CMD_H

#include <jansson.h>

#include "proxy/server.h"

/* verify RULE [--repair] [--touched] [--batch N] -> {"ok": true, "job": ID, "kind", "rule"} */
json_t *pd_cmd_verify(pd_server_t *srv, int argc, char **argv);

/* backfill RULE [--batch N] [--throttle MS] -> {"ok": true, "job": ID, "kind", "rule"} */
json_t *pd_cmd_backfill(pd_server_t *srv, int argc, char **argv);

/* jobs -> {"ok": true, "jobs": [...]}; jobs ID -> {"ok": true, "job": {...}} */
json_t *pd_cmd_jobs(pd_server_t *srv, int argc, char **argv);

/* cancel ID -> {"ok": true, "job": ID, "state": "cancelling"} */
json_t *pd_cmd_cancel(pd_server_t *srv, int argc, char **argv);

#endif /* PD_ADMIN_JOBS_CMD_H */
