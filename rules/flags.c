/*
 * flags.c — the flags this version can serve (see flags.h). Moved here from the server so
 * that `pgdual --check` and the server refuse the same flags with the same words.
 */
#include "rules/flags.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool new_authoritative(pd_writes_t w)
{
    return w == PD_WRITES_DUAL_NEW || w == PD_WRITES_NEW;
}

/*
 * Blue/green (kind: tables): a tables rule's flags say which database is authoritative
 * for the whole session: under old|dual sessions talk to old and new is the mirror; under
 * dual-new|new they talk to new (old the mirror under dual-new). Reads come from the
 * authoritative side, or both (shadow), or, under writes=dual, from new (reads=new or
 * new@N): the session then reads on new outside transactions once its own writes are
 * applied there.
 */
static const char *tables_rule_refusal(const pd_rule_cfg_t *r, pd_writes_t writes,
                                       const pd_reads_t *reads, pd_flag_key_t *key)
{
    *key = PD_FLAG_READS;
    if (r->kind != PD_RULE_TABLES)
        return reads->mode == PD_READS_AA
                   ? "reads=aa (A/A noise floor) is for kind: tables rules; a kind: columns "
                     "rule's shadow reads run in one database"
                   : NULL;
    if (reads->mode == PD_READS_AA && writes != PD_WRITES_OLD)
        return "reads=aa compares old against old, so it runs before writes are mirrored: "
               "measure the noise floor at writes=old, then set writes=dual reads=shadow";
    bool to_new = new_authoritative(writes);
    *key = PD_FLAG_WRITES;
    if (to_new && r->table_count > 0)
        return "writes=dual-new and writes=new make new authoritative for the whole database "
               "(sessions then talk to new only), so the rule must cover every table: omit "
               "`tables` from the rule";
    *key = PD_FLAG_READS;
    if (reads->mode == PD_READS_SHADOW && writes != PD_WRITES_DUAL && writes != PD_WRITES_DUAL_NEW)
        return "reads=shadow of a kind: tables rule needs both sides written (writes=dual or "
               "dual-new) to be compared";
    if (reads->mode == PD_READS_NEW && reads->percent < 100 && to_new)
        return "gradual reads (new@N) of a kind: tables rule are for before the switchover "
               "(writes=dual): with new authoritative every session reads new";
    if (reads->mode == PD_READS_NEW && reads->percent > 0 && writes != PD_WRITES_DUAL && !to_new)
        return "reads=new of a kind: tables rule needs new written: set writes=dual first (or "
               "pgdualctl switchover, which flips reads and writes together)";
    if (reads->mode == PD_READS_NEW && reads->percent > 0 && !to_new && r->column_count > 0)
        return "reads=new of a kind: tables rule that maps columns is served by new only after "
               "the switchover (reads are translated for new's schema then): use reads=shadow "
               "to compare, then pgdualctl switchover";
    if (reads->mode == PD_READS_OLD && to_new)
        return "reads=old of a kind: tables rule needs old authoritative (writes=old or dual): "
               "pgdualctl rollback flips both";
    return NULL;
}

/*
 * Reads must come from a side that is written: under writes=old nothing writes the new
 * columns, so reads=new would serve what nobody keeps up; under writes=new nothing
 * writes the old ones, so every read must be served from new.
 */
static const char *pairing_refusal(pd_writes_t writes, const pd_reads_t *reads, pd_flag_key_t *key)
{
    *key = PD_FLAG_READS;
    if (writes == PD_WRITES_OLD && reads->mode == PD_READS_NEW && reads->percent > 0)
        return "reads=new needs the new columns written: set writes=dual (and backfill) first";
    *key = PD_FLAG_WRITES;
    if (writes == PD_WRITES_NEW && (reads->mode != PD_READS_NEW || reads->percent < 100))
        return "writes=new leaves the old columns unwritten: reads must be new (new@100)";
    return NULL;
}

const char *pd_flags_refusal(const pd_rule_cfg_t *r, pd_writes_t writes, const pd_reads_t *reads,
                             pd_flag_key_t *key)
{
    pd_flag_key_t k;
    const char *why = tables_rule_refusal(r, writes, reads, &k);
    if (why == NULL)
        why = pairing_refusal(writes, reads, &k);
    if (key != NULL)
        *key = k;
    return why;
}

/*
 * Every tables rule of a database must agree on which side is authoritative; and a
 * session's second connection goes either to the other database (writes mirrored) or to
 * the same one (reads=aa), so the two cannot mix within a database.
 */
/* A tables rule translating its columns for new (new authoritative): the mirror then
   replays the client's own text on old, which a columns rule's rewrite would not reach. */
static bool translating(const pd_rule_cfg_t *r, pd_writes_t writes)
{
    return r->kind == PD_RULE_TABLES && r->column_count > 0 && new_authoritative(writes);
}

static bool columns_active(const pd_rule_cfg_t *r, pd_writes_t writes, const pd_reads_t *reads)
{
    return r->kind == PD_RULE_COLUMNS && (writes != PD_WRITES_OLD || reads->mode != PD_READS_OLD);
}

const char *pd_flags_database_refusal(const pd_config_t *cfg, const pd_rule_flags_t *flags,
                                      unsigned rule, pd_writes_t writes, const pd_reads_t *reads,
                                      pd_flag_key_t *key)
{
    const pd_rule_cfg_t *r = &cfg->rules[rule];
    for (unsigned i = 0; i < cfg->rule_count; i++) {
        const pd_rule_cfg_t *o = &cfg->rules[i];
        if (i == rule || strcmp(o->database, r->database) != 0)
            continue;
        if ((translating(r, writes) && columns_active(o, flags[i].writes, &flags[i].reads)) ||
            (columns_active(r, writes, reads) && translating(o, flags[i].writes))) {
            if (key != NULL)
                *key = PD_FLAG_WRITES;
            return "a kind: tables rule that maps columns, with new authoritative, cannot run "
                   "beside an active kind: columns rule of the same database (old would get "
                   "the application's statements without the columns rule's rewrite): set the "
                   "columns rule to writes=old reads=old first";
        }
    }
    if (r->kind != PD_RULE_TABLES)
        return NULL;
    for (unsigned i = 0; i < cfg->rule_count; i++) {
        if (i == rule || cfg->rules[i].kind != PD_RULE_TABLES ||
            strcmp(cfg->rules[i].database, r->database) != 0)
            continue;
        if (new_authoritative(flags[i].writes) != new_authoritative(writes)) {
            if (key != NULL)
                *key = PD_FLAG_WRITES;
            return "another kind: tables rule of the database has the other side "
                   "authoritative; the database's tables rules must flip together (pgdualctl "
                   "switchover/rollback DB)";
        }
        if ((reads->mode == PD_READS_AA && flags[i].writes != PD_WRITES_OLD) ||
            (flags[i].reads.mode == PD_READS_AA && writes != PD_WRITES_OLD)) {
            if (key != NULL)
                *key = reads->mode == PD_READS_AA ? PD_FLAG_READS : PD_FLAG_WRITES;
            return "reads=aa cannot run while another kind: tables rule of the database "
                   "mirrors writes (sessions' second connection would go to new): set the "
                   "other rule's reads off aa first, or its writes to old";
        }
    }
    return NULL;
}

static void add_error(pd_config_errors_t *errs, const pd_config_t *cfg, const pd_rule_cfg_t *r,
                      pd_flag_key_t key, const char *why)
{
    char rtext[32];
    bool reads = key == PD_FLAG_READS;
    char *msg = NULL;
    if (asprintf(
            &msg, "%s:%u:%u: rule \"%s\": %s: %s cannot be served with %s: %s: %s", cfg->path,
            reads ? r->reads_line : r->writes_line, reads ? r->reads_column : r->writes_column,
            r->name, reads ? "reads" : "writes",
            reads ? pd_reads_format(&r->reads, rtext, sizeof rtext) : pd_writes_name(r->writes),
            reads ? "writes" : "reads",
            reads ? pd_writes_name(r->writes) : pd_reads_format(&r->reads, rtext, sizeof rtext),
            why) < 0)
        return;
    char **msgs = realloc(errs->msgs, (errs->count + 1) * sizeof *msgs);
    if (msgs == NULL) {
        free(msg);
        return;
    }
    errs->msgs = msgs;
    msgs[errs->count++] = msg;
}

size_t pd_flags_check_config(const pd_config_t *cfg, pd_config_errors_t *errs)
{
    pd_rule_flags_t *flags = calloc(cfg->rule_count + 1, sizeof *flags);
    if (flags == NULL)
        return 0;
    for (unsigned i = 0; i < cfg->rule_count; i++)
        flags[i] = (pd_rule_flags_t){cfg->rules[i].writes, cfg->rules[i].reads};
    size_t found = 0;
    for (unsigned i = 0; i < cfg->rule_count; i++) {
        const pd_rule_cfg_t *r = &cfg->rules[i];
        pd_flag_key_t key = PD_FLAG_WRITES;
        const char *why = pd_flags_refusal(r, r->writes, &r->reads, &key);
        if (why == NULL)
            why = pd_flags_database_refusal(cfg, flags, i, r->writes, &r->reads, &key);
        if (why != NULL) {
            add_error(errs, cfg, r, key, why);
            found++;
        }
    }
    free(flags);
    return found;
}
