/*
 * sql_tree.c — small tools over libpg_query's protobuf-c parse trees: constructors for the
 * few nodes the rewriter builds, deep copy, in-place replacement, a generic walk driven by
 * the protobuf-c descriptors (so that no node type is forgotten), single-statement
 * deparse, and PostgreSQL's rules for naming result columns.
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "rules/sql_internal.h"

/* ---------------------------------------------------------------------------------------
 * Constructors.
 */

/* Every member of a Node's oneof is a message pointer, and they share one union slot:
   storing through the first member stores any of them. */
pd__node_t *pd__node_wrap(PgQuery__Node__NodeCase kind, void *msg)
{
    if (msg == NULL)
        return NULL;
    pd__node_t *n = malloc(sizeof *n);
    if (n == NULL) {
        protobuf_c_message_free_unpacked(msg, NULL);
        return NULL;
    }
    pg_query__node__init(n);
    n->node_case = kind;
    n->alias = msg;
    return n;
}

/* Packing and unpacking again is the simplest faithful deep copy of a protobuf tree. */
pd__node_t *pd__node_copy(const pd__node_t *n)
{
    size_t len = pg_query__node__get_packed_size(n);
    uint8_t *buf = malloc(len > 0 ? len : 1);
    if (buf == NULL)
        return NULL;
    pg_query__node__pack(n, buf);
    pd__node_t *copy = pg_query__node__unpack(NULL, len, buf);
    free(buf);
    return copy;
}

void pd__node_free(pd__node_t *n)
{
    if (n != NULL)
        pg_query__node__free_unpacked(n, NULL);
}

void pd__node_become(pd__node_t *dst, pd__node_t *src)
{
    if (dst->node_case != PG_QUERY__NODE__NODE__NOT_SET && dst->alias != NULL)
        protobuf_c_message_free_unpacked(&dst->alias->base, NULL);
    dst->node_case = src->node_case;
    dst->alias = src->alias;
    free(src);
}

pd__node_t *pd__make_string(const char *s)
{
    PgQuery__String *str = malloc(sizeof *str);
    char *dup = strdup(s);
    if (str == NULL || dup == NULL) {
        free(str);
        free(dup);
        return NULL;
    }
    pg_query__string__init(str);
    str->sval = dup;
    return pd__node_wrap(PG_QUERY__NODE__NODE_STRING, str);
}

static PgQuery__ColumnRef *new_column_ref(void)
{
    PgQuery__ColumnRef *ref = malloc(sizeof *ref);
    if (ref != NULL) {
        pg_query__column_ref__init(ref);
        ref->location = -1;
    }
    return ref;
}

pd__node_t *pd__make_column_ref(const char *qual, const char *name)
{
    PgQuery__ColumnRef *ref = new_column_ref();
    pd__node_t *n = pd__node_wrap(PG_QUERY__NODE__NODE_COLUMN_REF, ref);
    if (n == NULL)
        return NULL;
    if ((qual != NULL && !pd__append(&ref->fields, &ref->n_fields, pd__make_string(qual))) ||
        !pd__append(&ref->fields, &ref->n_fields, pd__make_string(name))) {
        pd__node_free(n);
        return NULL;
    }
    return n;
}

pd__node_t *pd__make_column_ref_like(const PgQuery__ColumnRef *like, const char *name)
{
    PgQuery__ColumnRef *ref = new_column_ref();
    pd__node_t *n = pd__node_wrap(PG_QUERY__NODE__NODE_COLUMN_REF, ref);
    if (n == NULL)
        return NULL;
    for (size_t i = 0; i + 1 < like->n_fields; i++)
        if (!pd__append(&ref->fields, &ref->n_fields, pd__node_copy(like->fields[i]))) {
            pd__node_free(n);
            return NULL;
        }
    if (!pd__append(&ref->fields, &ref->n_fields, pd__make_string(name))) {
        pd__node_free(n);
        return NULL;
    }
    return n;
}

pd__node_t *pd__make_star_ref(const char *qual)
{
    PgQuery__ColumnRef *ref = new_column_ref();
    pd__node_t *n = pd__node_wrap(PG_QUERY__NODE__NODE_COLUMN_REF, ref);
    if (n == NULL)
        return NULL;
    PgQuery__AStar *star = malloc(sizeof *star);
    if (star != NULL)
        pg_query__a__star__init(star);
    if ((qual != NULL && !pd__append(&ref->fields, &ref->n_fields, pd__make_string(qual))) ||
        !pd__append(&ref->fields, &ref->n_fields,
                    pd__node_wrap(PG_QUERY__NODE__NODE_A_STAR, star))) {
        pd__node_free(n);
        return NULL;
    }
    return n;
}

pd__node_t *pd__make_res_target(const char *name, pd__node_t *val)
{
    PgQuery__ResTarget *rt = malloc(sizeof *rt);
    char *dup = name != NULL ? strdup(name) : NULL;
    if (rt == NULL || (name != NULL && dup == NULL)) {
        free(rt);
        free(dup);
        pd__node_free(val);
        return NULL;
    }
    pg_query__res_target__init(rt);
    if (dup != NULL)
        rt->name = dup;
    rt->val = val;
    rt->location = -1;
    return pd__node_wrap(PG_QUERY__NODE__NODE_RES_TARGET, rt);
}

pd__node_t *pd__make_list(void)
{
    PgQuery__List *list = malloc(sizeof *list);
    if (list != NULL)
        pg_query__list__init(list);
    return pd__node_wrap(PG_QUERY__NODE__NODE_LIST, list);
}

bool pd__insert(pd__node_t ***arr, size_t *n, size_t at, pd__node_t *item)
{
    if (item == NULL)
        return false;
    pd__node_t **grown = realloc(*arr, (*n + 1) * sizeof *grown);
    if (grown == NULL) {
        pd__node_free(item);
        return false;
    }
    memmove(grown + at + 1, grown + at, (*n - at) * sizeof *grown);
    grown[at] = item;
    *arr = grown;
    (*n)++;
    return true;
}

bool pd__append(pd__node_t ***arr, size_t *n, pd__node_t *item)
{
    return pd__insert(arr, n, *n, item);
}

/* ---------------------------------------------------------------------------------------
 * Accessors.
 */
const char *pd__str(const pd__node_t *n)
{
    if (n == NULL || n->node_case != PG_QUERY__NODE__NODE_STRING || n->string == NULL)
        return NULL;
    return n->string->sval;
}

const char *pd__plain_ref(const pd__node_t *n)
{
    if (n == NULL || n->node_case != PG_QUERY__NODE__NODE_COLUMN_REF || n->column_ref == NULL ||
        n->column_ref->n_fields != 1)
        return NULL;
    return pd__str(n->column_ref->fields[0]);
}

bool pd__is_star(const PgQuery__ColumnRef *ref)
{
    return ref->n_fields > 0 &&
           ref->fields[ref->n_fields - 1]->node_case == PG_QUERY__NODE__NODE_A_STAR;
}

const char *pd__refname(const PgQuery__RangeVar *rv)
{
    if (rv->alias != NULL && rv->alias->aliasname != NULL && rv->alias->aliasname[0] != '\0')
        return rv->alias->aliasname;
    return rv->relname;
}

/* ---------------------------------------------------------------------------------------
 * Generic walk over the descriptors.
 */
void pd__each_child(ProtobufCMessage *m, pd__child_fn fn, void *arg)
{
    const ProtobufCMessageDescriptor *d = m->descriptor;
    char *base = (char *)m;
    if (d == &pg_query__node__descriptor) {
        /* A Node is a oneof over ~240 message fields, and the walks visit every node:
         * go straight to the set field (node_case is its field number) instead of
         * scanning them all. */
        const PgQuery__Node *node = (const PgQuery__Node *)m;
        if (node->node_case == PG_QUERY__NODE__NODE__NOT_SET)
            return;
        const ProtobufCFieldDescriptor *f =
            protobuf_c_message_descriptor_get_field(d, (unsigned)node->node_case);
        if (f == NULL || f->type != PROTOBUF_C_TYPE_MESSAGE)
            return;
        ProtobufCMessage *child = *(ProtobufCMessage **)(base + f->offset);
        if (child != NULL)
            fn(child, arg);
        return;
    }
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &d->fields[i];
        if (f->type != PROTOBUF_C_TYPE_MESSAGE)
            continue;
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t count = *(size_t *)(base + f->quantifier_offset);
            ProtobufCMessage **arr = *(ProtobufCMessage ***)(base + f->offset);
            for (size_t k = 0; k < count; k++)
                if (arr[k] != NULL)
                    fn(arr[k], arg);
            continue;
        }
        if ((f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
            *(uint32_t *)(base + f->quantifier_offset) != f->id)
            continue;
        ProtobufCMessage *child = *(ProtobufCMessage **)(base + f->offset);
        if (child != NULL)
            fn(child, arg);
    }
}

typedef struct {
    pd__visit_fn fn;
    void *arg;
    int depth;
    bool too_deep;
} walk_t;

static void walk_child(ProtobufCMessage *m, void *p)
{
    walk_t *w = p;
    if (w->too_deep)
        return;
    if (++w->depth > PD__MAX_DEPTH) {
        w->too_deep = true;
        return;
    }
    bool descend = true;
    if (m->descriptor == &pg_query__node__descriptor)
        descend = w->fn((pd__node_t *)m, w->arg);
    if (descend)
        pd__each_child(m, walk_child, w);
    w->depth--;
}

bool pd__walk(ProtobufCMessage *m, pd__visit_fn fn, void *arg)
{
    walk_t w = {.fn = fn, .arg = arg};
    walk_child(m, &w);
    return !w.too_deep;
}

/* Functions whose every call may give another value: copying an expression that calls one
   into a second column would write two different values. User-defined volatile functions
   are not known here (that needs the catalog). */
static const char *const volatile_functions[] = {
    "random",
    "setseed",
    "nextval",
    "setval",
    "gen_random_uuid",
    "uuid_generate_v1",
    "uuid_generate_v1mc",
    "uuid_generate_v4",
    "clock_timestamp",
    "timeofday",
    "random_normal",
    "txid_current",
    "pg_sleep",
    "dblink_exec",
    "lo_import",
    "lo_creat",
};

typedef struct {
    const char *fname;
} volatile_t;

static bool find_volatile(pd__node_t *n, void *arg)
{
    volatile_t *v = arg;
    if (v->fname != NULL)
        return false;
    if (n->node_case != PG_QUERY__NODE__NODE_FUNC_CALL || n->func_call->n_funcname == 0)
        return true;
    const char *name = pd__str(n->func_call->funcname[n->func_call->n_funcname - 1]);
    for (size_t i = 0; name != NULL && i < sizeof volatile_functions / sizeof *volatile_functions;
         i++)
        if (strcmp(name, volatile_functions[i]) == 0) {
            v->fname = name;
            return false;
        }
    return true;
}

bool pd__calls_volatile(const pd__node_t *n, const char **fname)
{
    volatile_t v = {0};
    /* The walk does not modify the tree; the cast only fits the visitor's signature. */
    if (!pd__walk((ProtobufCMessage *)&n->base, find_volatile, &v))
        v.fname = "?";
    *fname = v.fname;
    return v.fname != NULL;
}

static bool find_dml(pd__node_t *n, void *arg)
{
    bool *found = arg;
    switch (n->node_case) {
    case PG_QUERY__NODE__NODE_INSERT_STMT:
    case PG_QUERY__NODE__NODE_UPDATE_STMT:
    case PG_QUERY__NODE__NODE_DELETE_STMT:
    case PG_QUERY__NODE__NODE_MERGE_STMT:
        *found = true;
        return false;
    default:
        return !*found;
    }
}

bool pd__has_dml(const pd__node_t *n)
{
    bool found = false;
    if (!pd__walk((ProtobufCMessage *)&n->base, find_dml, &found))
        return true; /* too deep to tell: assume the worst */
    return found;
}

/* ---------------------------------------------------------------------------------------
 * Parse and deparse.
 */
static bool is_bare_select(const PgQuery__SelectStmt *s)
{
    return s->n_target_list == 1 && s->n_from_clause == 0 && s->where_clause == NULL &&
           s->n_group_clause == 0 && s->having_clause == NULL && s->n_sort_clause == 0 &&
           s->n_values_lists == 0 && s->with_clause == NULL && s->n_distinct_clause == 0 &&
           s->limit_count == NULL && s->limit_offset == NULL && s->into_clause == NULL &&
           s->n_window_clause == 0 && s->n_locking_clause == 0 && s->larg == NULL &&
           s->target_list[0]->node_case == PG_QUERY__NODE__NODE_RES_TARGET;
}

/* An expression is parsed as the single target of a SELECT, so that the text cannot smuggle
   in a second statement or clause. */
pd__node_t *pd__parse_expr(const char *text)
{
    size_t len = strlen(text);
    char *sql = malloc(len + sizeof "SELECT ");
    if (sql == NULL)
        return NULL;
    memcpy(sql, "SELECT ", 7);
    memcpy(sql + 7, text, len + 1);
    PgQuery__ParseResult *tree = pd__parse_tree(sql);
    free(sql);
    pd__node_t *expr = NULL;
    if (tree != NULL && tree->n_stmts == 1 && tree->stmts[0]->stmt != NULL &&
        tree->stmts[0]->stmt->node_case == PG_QUERY__NODE__NODE_SELECT_STMT &&
        is_bare_select(tree->stmts[0]->stmt->select_stmt)) {
        PgQuery__ResTarget *rt = tree->stmts[0]->stmt->select_stmt->target_list[0]->res_target;
        if (rt->name == NULL || rt->name[0] == '\0') {
            expr = rt->val; /* detached from the tree, which is freed below */
            rt->val = NULL;
        }
    }
    if (tree != NULL)
        pg_query__parse_result__free_unpacked(tree, NULL);
    return expr;
}

PgQuery__ParseResult *pd__parse_tree(const char *sql)
{
    PgQueryProtobufParseResult pr = pg_query_parse_protobuf(sql);
    PgQuery__ParseResult *tree = NULL;
    if (pr.error == NULL)
        tree = pg_query__parse_result__unpack(NULL, pr.parse_tree.len,
                                              (const uint8_t *)pr.parse_tree.data);
    pg_query_free_protobuf_parse_result(pr);
    return tree;
}

char *pd__deparse(PgQuery__RawStmt *raw, int32_t version)
{
    PgQuery__ParseResult pr = PG_QUERY__PARSE_RESULT__INIT;
    pr.version = version;
    pr.n_stmts = 1;
    pr.stmts = &raw;
    PgQueryProtobuf pb;
    pb.len = pg_query__parse_result__get_packed_size(&pr);
    pb.data = malloc(pb.len > 0 ? pb.len : 1);
    if (pb.data == NULL)
        return NULL;
    pg_query__parse_result__pack(&pr, (uint8_t *)pb.data);
    PgQueryDeparseResult d = pg_query_deparse_protobuf(pb);
    free(pb.data);
    char *out = d.error == NULL && d.query != NULL ? strdup(d.query) : NULL;
    pg_query_free_deparse_result(d);
    return out;
}

/* ---------------------------------------------------------------------------------------
 * Result column names (PostgreSQL's FigureColnameInternal, parser/parse_target.c), for the
 * node types through which a column reference gives its name to the result column. Other
 * expressions get names the rewriter never changes, so they need no case here.
 */
/* The last String among fields, ignoring `*` and subscripts, as PostgreSQL does. */
static const char *last_string(pd__node_t **fields, size_t n)
{
    const char *name = NULL;
    for (size_t i = 0; i < n; i++)
        if (pd__str(fields[i]) != NULL)
            name = pd__str(fields[i]);
    return name;
}

static int figure(const pd__node_t *n, const char **name);

static int sublink_colname(const PgQuery__SubLink *sl, const char **name)
{
    if (sl->sub_link_type == PG_QUERY__SUB_LINK_TYPE__EXISTS_SUBLINK) {
        *name = "exists";
        return 2;
    }
    if (sl->sub_link_type == PG_QUERY__SUB_LINK_TYPE__ARRAY_SUBLINK) {
        *name = "array";
        return 2;
    }
    if (sl->sub_link_type != PG_QUERY__SUB_LINK_TYPE__EXPR_SUBLINK || sl->subselect == NULL ||
        sl->subselect->node_case != PG_QUERY__NODE__NODE_SELECT_STMT)
        return 0;
    const PgQuery__SelectStmt *s = sl->subselect->select_stmt;
    while (s->larg != NULL)
        s = s->larg; /* a set operation is named by its first branch */
    if (s->n_target_list == 0 || s->target_list[0]->node_case != PG_QUERY__NODE__NODE_RES_TARGET)
        return 0;
    const PgQuery__ResTarget *rt = s->target_list[0]->res_target;
    if (rt->name != NULL && rt->name[0] != '\0') {
        *name = rt->name;
        return 2;
    }
    return rt->val != NULL && figure(rt->val, name) > 0 ? 2 : 0;
}

/* Returns PostgreSQL's "strength" of the name: 2 a real name, 1 a fallback, 0 none. */
static int figure(const pd__node_t *n, const char **name)
{
    int strength;
    switch (n->node_case) {
    case PG_QUERY__NODE__NODE_COLUMN_REF:
        *name = last_string(n->column_ref->fields, n->column_ref->n_fields);
        return *name != NULL ? 2 : 0;
    case PG_QUERY__NODE__NODE_A_INDIRECTION:
        *name = last_string(n->a_indirection->indirection, n->a_indirection->n_indirection);
        if (*name != NULL)
            return 2;
        return n->a_indirection->arg != NULL ? figure(n->a_indirection->arg, name) : 0;
    case PG_QUERY__NODE__NODE_FUNC_CALL:
        *name = last_string(n->func_call->funcname, n->func_call->n_funcname);
        return *name != NULL ? 2 : 0;
    case PG_QUERY__NODE__NODE_A_EXPR:
        if (n->a_expr->kind != PG_QUERY__A__EXPR__KIND__AEXPR_NULLIF)
            return 0;
        *name = "nullif";
        return 2;
    case PG_QUERY__NODE__NODE_TYPE_CAST:
        strength = n->type_cast->arg != NULL ? figure(n->type_cast->arg, name) : 0;
        if (strength <= 1 && n->type_cast->type_name != NULL) {
            *name = last_string(n->type_cast->type_name->names, n->type_cast->type_name->n_names);
            return 1;
        }
        return strength;
    case PG_QUERY__NODE__NODE_COLLATE_CLAUSE:
        return n->collate_clause->arg != NULL ? figure(n->collate_clause->arg, name) : 0;
    case PG_QUERY__NODE__NODE_CASE_EXPR:
        strength = n->case_expr->defresult != NULL ? figure(n->case_expr->defresult, name) : 0;
        if (strength <= 1) {
            *name = "case";
            return 1;
        }
        return strength;
    case PG_QUERY__NODE__NODE_SUB_LINK:
        return sublink_colname(n->sub_link, name);
    default:
        return 0;
    }
}

const char *pd__figure_colname(const pd__node_t *n)
{
    const char *name = NULL;
    return figure(n, &name) > 0 ? name : NULL;
}
