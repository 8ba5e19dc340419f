/*
 * touched.h — the keys of rows written since the last verify, per (rule, table), so that
 * `pgdualctl verify RULE --touched` re-checks only those rows instead of whole tables.
 *
 * Who calls what:
 *  - the proxy's mirror (kind `tables` rules), after each write it mirrors:
 *      pd_touched_add() for every key the write touched, or
 *      pd_touched_mark_unknown() when it could not capture the keys (a statement whose
 *      affected rows are not known, a mirror that detached, a table without a key);
 *  - a verify job: pd_touched_take() for each table at its start (writes from then on
 *    go to a fresh set), pd_touched_restore() when it does not finish, and
 *    pd_touched_add() again for the divergent keys it leaves unrepaired, so that the
 *    next `--touched` verify looks at them again.
 *
 * Names: `rule` is the rule's name (names survive reloads, indexes do not); `table` is
 * "schema.table" exactly as the catalog spells both parts (pg_namespace.nspname, ".",
 * pg_class.relname, unquoted: "public.orders", "Sales.Order Items"). Keys are arrays of
 * `nkey` text values (PostgreSQL's text output of each key column; NULL for SQL NULL) in
 * the order of the table's verify key: the rule's `key` when it names one, else the
 * columns of the table's primary key in index order. Two keys are the same key when
 * every value is byte for byte the same.
 *
 * The mirror's side, e.g. after it applied a write that RETURNING said touched id 42:
 *     pd_touched_t *t = pd_jobs_touched(srv->jobs);      (admin/jobs.h; one per pgdual)
 *     const char *key[1] = {"42"};
 *     pd_touched_add(t, rule->name, "public.orders", 1, key);
 * and for a write whose rows it cannot name (UPDATE ... WHERE without RETURNING, a
 * detached session's lost writes, a table without a key):
 *     pd_touched_mark_unknown(t, rule->name, "public.orders");
 *
 * A table's set is in one of three states:
 *  - known (PD_TOUCHED_KEYS): exactly the keys added since the last take;
 *  - unknown (PD_TOUCHED_UNKNOWN): every table starts so (nothing is known about writes
 *    before this process started) until a verify takes it; pd_touched_mark_unknown()
 *    returns it there, and so does a key that cannot be kept (see pd_touched_add);
 *  - overflowed (PD_TOUCHED_OVERFLOW): more than the maximum number of keys were added;
 *    the keys are dropped (memory stays bounded).
 * A verify treats unknown and overflowed tables by checking them in full.
 *
 * Memory: at most `max_keys` keys per table, each at most PD_TOUCHED_KEY_BYTES_MAX bytes
 * of values (a longer key marks the table unknown). All functions are thread-safe (one
 * mutex; an add is one lookup and one insert in balanced trees).
 */
#ifndef PD_RULES_TOUCHED_H
#define PD_RULES_TOUCHED_H

#include <stdbool.h>
#include <stddef.h>

#define PD_TOUCHED_DEFAULT_MAX   100000 /* keys per table before it overflows */
#define PD_TOUCHED_KEY_BYTES_MAX 2048   /* values of one key, in bytes */

typedef enum { PD_TOUCHED_KEYS, PD_TOUCHED_UNKNOWN, PD_TOUCHED_OVERFLOW } pd_touched_status_t;

typedef struct pd_touched pd_touched_t;

/* A set taken from a table by pd_touched_take(); owned by the caller. */
typedef struct pd_touched_set pd_touched_set_t;

/* An empty registry (every table unknown); max_keys per table (0: the default). NULL when
 * out of memory. */
pd_touched_t *pd_touched_new(size_t max_keys);
void pd_touched_free(pd_touched_t *t);

/* Changes the maximum for sets from now on (a set already past it overflows at its next
 * add). 0: the default. */
void pd_touched_set_max(pd_touched_t *t, size_t max_keys);

/*
 * Records that a write changed the row with this key (nkey values, see above) in table of
 * rule. Adding a key already in the set changes nothing. Does nothing more to an unknown
 * or overflowed table. nkey 0, a key of another length than the set's first, or a key
 * longer than PD_TOUCHED_KEY_BYTES_MAX marks the table unknown. Out of memory marks the
 * table unknown too (so nothing is missed) and returns -1; else 0.
 */
int pd_touched_add(pd_touched_t *t, const char *rule, const char *table, unsigned nkey,
                   const char *const *key);

/* A write's keys could not be captured: the table needs a full verify. */
void pd_touched_mark_unknown(pd_touched_t *t, const char *rule, const char *table);

/* The status of a table's set and its number of keys, without taking it (for status). */
pd_touched_status_t pd_touched_peek(pd_touched_t *t, const char *rule, const char *table,
                                    size_t *count);

/*
 * Takes a table's set for a verify: the caller gets what was recorded, and the table
 * starts a fresh, known, empty set (writes during the verify are recorded there). NULL
 * when out of memory (the table is then left as it was).
 */
pd_touched_set_t *pd_touched_take(pd_touched_t *t, const char *rule, const char *table);

/*
 * Gives a taken set back when its verify did not finish (failed, cancelled): its keys are
 * merged into the table's current set, and a taken unknown or overflowed status returns.
 * Frees the set. NULL set: nothing.
 */
void pd_touched_restore(pd_touched_t *t, const char *rule, const char *table,
                        pd_touched_set_t *set);

/* A taken set: its status, its number of keys, the values per key (0 when no key was
 * added), and key i (nkey values, NULL for SQL NULL; valid until the set is freed). */
pd_touched_status_t pd_touched_set_status(const pd_touched_set_t *set);
size_t pd_touched_set_count(const pd_touched_set_t *set);
unsigned pd_touched_set_nkey(const pd_touched_set_t *set);
const char *const *pd_touched_set_key(const pd_touched_set_t *set, size_t i);
void pd_touched_set_free(pd_touched_set_t *set);

/* How keys are told apart here, for callers that match keys themselves: 0 for the same
 * key, else an order (SQL NULL before any value, values in byte order). */
int pd_touched_key_cmp(unsigned n, const char *const *a, const char *const *b);

/* "keys", "unknown", "overflowed". */
const char *pd_touched_status_name(pd_touched_status_t status);

#endif /* PD_RULES_TOUCHED_H */
