/*
 * route.h — per statement, what the rules and flags mean for one session: the session's
 * view of each rule's flags (reads new@N resolved stickily), the rewrite, the counters,
 * and the statement that makes PostgreSQL itself report a refusal.
 */
#ifndef PD_PROXY_ROUTE_H
#define PD_PROXY_ROUTE_H

#include <stdint.h>

#include "protocol/wire.h"
#include "proxy/server.h"
#include "rules/sql.h"

/* Whether any rule applies to database db. */
bool pd_route_db_has_rules(const pd_config_t *cfg, const char *db);

/*
 * The flags session `session_key` sees: for reads new@N, a session reads new when its
 * bucket for the rule (a hash of the session key and the rule name, 0..99) is below N,
 * so the choice is sticky, and raising N only moves sessions from old to new.
 */
void pd_route_views(const pd_server_t *srv, uint64_t session_key, pd_rule_view_t *views);
unsigned pd_route_bucket(uint64_t session_key, const char *rule);

/*
 * Classifies and rewrites one statement for a session, counting it per rule and
 * action. A rewrite concerning a rule whose catalog check failed becomes a refusal that
 * carries that check's error. NULL only when out of memory.
 */
pd_sql_result_t *pd_route_statement(pd_server_t *srv, const char *database, uint64_t session_key,
                                    const char *sql);

/*
 * Appends to out a statement that, run by PostgreSQL, fails with this SQLSTATE, message
 * and hint (a DO block that raises), so that the refusal aborts the client's transaction
 * exactly as an error of its own would.
 */
void pd_route_refusal_sql(pd_buf_t *out, const char *sqlstate, const char *message,
                          const char *hint);

#endif /* PD_PROXY_ROUTE_H */
