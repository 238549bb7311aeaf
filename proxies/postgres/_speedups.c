/*
 * Compiled hot loops of the PostgreSQL gateway.
 *
 * Everything here has a pure-Python twin that defines its behaviour
 * (proxies/postgres/rowmask.py); tests run both on the same inputs. The Python
 * code is used when this module is not built or KEYTURN_NO_SPEEDUPS=1 is set.
 *
 * RowMasker rewrites a run of DataRow messages in one call, so a masked
 * result of 100,000 rows costs a few calls per network chunk instead of one
 * Python call per row and per value.
 *
 * This file must not decide what an audit record holds: FastPath writes its
 * audit lines from pieces built by keyturn.auditschema (passed in by the
 * session), and tests check the lines it writes against that schema.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <time.h>

/* Operation codes; keep in step with rowmask.py. */
enum {
    OP_KEEP = 0,    /* field passes unchanged */
    OP_CONST = 1,   /* (1, bytes): every non-NULL value becomes these bytes */
    OP_NULL = 2,    /* (2,): every non-NULL value becomes NULL */
    OP_PARTIAL = 3, /* (3, keep, fallback): "****" + last keep chars (ASCII here) */
    OP_EMAIL = 4,   /* (4, fallback): first char + "***@" + domain (ASCII here) */
    OP_CALL = 5,    /* (5, fn): fn(bytes) -> bytes | None (None = NULL) */
    OP_DETECT = 6,  /* (6, fn): non-empty values; fn(bytes) -> bytes | None (None = unchanged) */
};

static const char FULL_MASK[] = "********";
#define FULL_MASK_LEN 8
static const char PARTIAL_PREFIX[] = "****";
#define PARTIAL_PREFIX_LEN 4

typedef struct {
    int kind;
    Py_ssize_t keep;
    PyObject *obj; /* constant bytes, or the callable (fallback) */
} Op;

typedef struct {
    PyObject_HEAD
    Py_ssize_t nops;
    Op *ops;
    Py_ssize_t *counts;
} RowMasker;

/* ---------------------------------------------------------------- buffer */

typedef struct {
    char *data;
    Py_ssize_t len;
    Py_ssize_t cap;
} Buf;

static int
buf_reserve(Buf *b, Py_ssize_t extra)
{
    if (b->len + extra <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra)
        cap *= 2;
    char *p = PyMem_Realloc(b->data, cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = p;
    b->cap = cap;
    return 0;
}

static int
buf_add(Buf *b, const char *src, Py_ssize_t n)
{
    if (n <= 0)
        return 0;
    if (buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

static inline void
put_u32(char *p, uint32_t v)
{
    p[0] = (char)(v >> 24);
    p[1] = (char)(v >> 16);
    p[2] = (char)(v >> 8);
    p[3] = (char)v;
}

static inline uint32_t
get_u32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* A field value: length -1 is NULL. */
static int
buf_field(Buf *b, const char *src, Py_ssize_t n)
{
    if (buf_reserve(b, 4 + (n > 0 ? n : 0)) < 0)
        return -1;
    put_u32(b->data + b->len, (uint32_t)(n < 0 ? -1 : n));
    b->len += 4;
    if (n > 0) {
        memcpy(b->data + b->len, src, n);
        b->len += n;
    }
    return 0;
}

/* ---------------------------------------------------------------- styles */

static inline int
is_ascii(const unsigned char *s, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (s[i] & 0x80)
            return 0;
    return 1;
}

/* Python's str.isspace() (and the re module's \s) for ASCII characters. */
static inline int
ascii_space(unsigned char c)
{
    return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F);
}

/* Append the value an op gives, or report NULL (*is_null = 1) / unchanged (*same = 1).
   Returns -1 with an exception set on failure. */
static int
apply_fallback(PyObject *fn, const char *v, Py_ssize_t n, Buf *out, int detect, int *same)
{
    PyObject *arg = PyBytes_FromStringAndSize(v, n);
    if (arg == NULL)
        return -1;
    PyObject *res = PyObject_CallOneArg(fn, arg);
    Py_DECREF(arg);
    if (res == NULL)
        return -1;
    int rc;
    if (res == Py_None) {
        if (detect) {
            *same = 1;
            rc = 0;
        }
        else {
            rc = buf_field(out, NULL, -1);
        }
    }
    else if (PyBytes_Check(res)) {
        rc = buf_field(out, PyBytes_AS_STRING(res), PyBytes_GET_SIZE(res));
    }
    else if (PyByteArray_Check(res)) {
        rc = buf_field(out, PyByteArray_AS_STRING(res), PyByteArray_GET_SIZE(res));
    }
    else {
        PyErr_Format(PyExc_TypeError, "masking function returned %.100s, not bytes or None",
                     Py_TYPE(res)->tp_name);
        rc = -1;
    }
    Py_DECREF(res);
    return rc;
}

static int
apply_partial(const Op *op, const char *v, Py_ssize_t n, Buf *out)
{
    if (!is_ascii((const unsigned char *)v, n)) {
        int same = 0;
        return apply_fallback(op->obj, v, n, out, 0, &same);
    }
    if (n <= op->keep)
        return buf_field(out, FULL_MASK, FULL_MASK_LEN);
    Py_ssize_t total = PARTIAL_PREFIX_LEN + op->keep;
    if (buf_reserve(out, 4 + total) < 0)
        return -1;
    char *p = out->data + out->len;
    put_u32(p, (uint32_t)total);
    memcpy(p + 4, PARTIAL_PREFIX, PARTIAL_PREFIX_LEN);
    memcpy(p + 4 + PARTIAL_PREFIX_LEN, v + n - op->keep, op->keep);
    out->len += 4 + total;
    return 0;
}

static int
apply_email(const Op *op, const char *v, Py_ssize_t n, Buf *out)
{
    const unsigned char *s = (const unsigned char *)v;
    if (!is_ascii(s, n)) {
        int same = 0;
        return apply_fallback(op->obj, v, n, out, 0, &same);
    }
    /* fullmatch of ([^@\s])[^@\s]*@([^@\s]+\.[^@\s]+) */
    Py_ssize_t at = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (ascii_space(s[i]))
            return buf_field(out, FULL_MASK, FULL_MASK_LEN);
        if (s[i] == '@') {
            if (at >= 0)
                return buf_field(out, FULL_MASK, FULL_MASK_LEN);
            at = i;
        }
    }
    Py_ssize_t dlen = n - at - 1;
    if (at < 1 || dlen < 3 || memchr(v + at + 2, '.', dlen - 2) == NULL)
        return buf_field(out, FULL_MASK, FULL_MASK_LEN);
    Py_ssize_t total = 1 + 4 + dlen;
    if (buf_reserve(out, 4 + total) < 0)
        return -1;
    char *p = out->data + out->len;
    put_u32(p, (uint32_t)total);
    p[4] = v[0];
    memcpy(p + 5, "***@", 4);
    memcpy(p + 9, v + at + 1, dlen);
    out->len += 4 + total;
    return 0;
}

/* ---------------------------------------------------------------- RowMasker */

static void
RowMasker_dealloc(RowMasker *self)
{
    if (self->ops != NULL) {
        for (Py_ssize_t i = 0; i < self->nops; i++)
            Py_XDECREF(self->ops[i].obj);
        PyMem_Free(self->ops);
    }
    PyMem_Free(self->counts);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
parse_op(PyObject *item, Op *op)
{
    op->kind = OP_KEEP;
    op->keep = 0;
    op->obj = NULL;
    if (item == Py_None)
        return 0;
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) < 1) {
        PyErr_SetString(PyExc_TypeError, "each op must be None or a tuple (kind, ...)");
        return -1;
    }
    long kind = PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
    if (kind == -1 && PyErr_Occurred())
        return -1;
    Py_ssize_t size = PyTuple_GET_SIZE(item);
    PyObject *obj = NULL;
    switch (kind) {
    case OP_CONST:
        if (size != 2 || !PyBytes_Check(PyTuple_GET_ITEM(item, 1)))
            goto bad;
        obj = PyTuple_GET_ITEM(item, 1);
        break;
    case OP_NULL:
        if (size != 1)
            goto bad;
        break;
    case OP_PARTIAL:
        if (size != 3)
            goto bad;
        op->keep = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 1));
        if (op->keep == -1 && PyErr_Occurred())
            return -1;
        if (op->keep < 1)
            goto bad;
        obj = PyTuple_GET_ITEM(item, 2);
        if (!PyCallable_Check(obj))
            goto bad;
        break;
    case OP_EMAIL:
    case OP_CALL:
    case OP_DETECT:
        if (size != 2 || !PyCallable_Check(PyTuple_GET_ITEM(item, 1)))
            goto bad;
        obj = PyTuple_GET_ITEM(item, 1);
        break;
    default:
        goto bad;
    }
    op->kind = (int)kind;
    Py_XINCREF(obj);
    op->obj = obj;
    return 0;
bad:
    PyErr_Format(PyExc_ValueError, "invalid masking op %R", item);
    return -1;
}

static PyObject *
RowMasker_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ops", NULL};
    PyObject *ops;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:RowMasker", kwlist, &ops))
        return NULL;
    PyObject *seq = PySequence_Fast(ops, "ops must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > 0x7FFF) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many ops");
        return NULL;
    }
    RowMasker *self = (RowMasker *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    self->nops = 0;
    self->ops = PyMem_Calloc(n ? n : 1, sizeof(Op));
    self->counts = PyMem_Calloc(n ? n : 1, sizeof(Py_ssize_t));
    if (self->ops == NULL || self->counts == NULL) {
        Py_DECREF(seq);
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (parse_op(PySequence_Fast_GET_ITEM(seq, i), &self->ops[i]) < 0) {
            Py_DECREF(seq);
            Py_DECREF(self);
            return NULL;
        }
        self->nops = i + 1;
    }
    self->nops = n;
    Py_DECREF(seq);
    return (PyObject *)self;
}

static PyObject *
malformed(Py_ssize_t at)
{
    PyErr_Format(PyExc_ValueError, "malformed DataRow at offset %zd", at);
    return NULL;
}

/* Rewrite one DataRow body [p, end) into out; *changed is set when a field changed. */
static int
rewrite_row(RowMasker *self, const char *base, Py_ssize_t p, Py_ssize_t end, Buf *out,
            Py_ssize_t msg_start, int *changed)
{
    const unsigned char *u = (const unsigned char *)base;
    if (end - p < 2) {
        malformed(msg_start);
        return -1;
    }
    Py_ssize_t nfields = (u[p] << 8) | u[p + 1];
    Py_ssize_t head = out->len; /* where this message starts in out */
    if (buf_reserve(out, end - msg_start) < 0)
        return -1;
    /* type byte, a length patched below, field count */
    out->data[out->len] = 'D';
    out->len += 5;
    if (buf_add(out, base + p, 2) < 0)
        return -1;
    p += 2;
    Py_ssize_t keep = p; /* first byte not yet copied */
    Py_ssize_t limit = nfields < self->nops ? nfields : self->nops;
    for (Py_ssize_t i = 0; i < limit; i++) {
        if (end - p < 4) {
            malformed(msg_start);
            return -1;
        }
        int32_t ln = (int32_t)get_u32(u + p);
        Py_ssize_t vstart = p + 4;
        Py_ssize_t vend = vstart + (ln > 0 ? ln : 0);
        if (ln < -1 || vend > end) {
            malformed(msg_start);
            return -1;
        }
        const Op *op = &self->ops[i];
        if (op->kind == OP_KEEP || ln == -1 || (op->kind == OP_DETECT && ln == 0)) {
            p = vend;
            continue;
        }
        /* copy what precedes this field, then its new form */
        if (buf_add(out, base + keep, p - keep) < 0)
            return -1;
        const char *v = base + vstart;
        int rc = 0, same = 0;
        switch (op->kind) {
        case OP_CONST:
            rc = buf_field(out, PyBytes_AS_STRING(op->obj), PyBytes_GET_SIZE(op->obj));
            break;
        case OP_NULL:
            rc = buf_field(out, NULL, -1);
            break;
        case OP_PARTIAL:
            rc = apply_partial(op, v, ln, out);
            break;
        case OP_EMAIL:
            rc = apply_email(op, v, ln, out);
            break;
        case OP_CALL:
            rc = apply_fallback(op->obj, v, ln, out, 0, &same);
            break;
        case OP_DETECT:
            rc = apply_fallback(op->obj, v, ln, out, 1, &same);
            if (same && rc == 0)
                rc = buf_add(out, base + p, vend - p);
            break;
        }
        if (rc < 0)
            return -1;
        if (op->kind != OP_DETECT)
            self->counts[i]++;
        if (!same)
            *changed = 1;
        keep = p = vend;
    }
    /* the fields after the last op, copied without being walked */
    if (buf_add(out, base + keep, end - keep) < 0)
        return -1;
    put_u32(out->data + head + 1, (uint32_t)(out->len - head - 1));
    return 0;
}

PyDoc_STRVAR(RowMasker_rows_doc,
"rows(chunk, start, end) -> bytes | None\n\n"
"Rewrite the messages in chunk[start:end] (whole messages). DataRows get their\n"
"fields masked; other messages are copied. Returns the new bytes, or None when\n"
"nothing changed. Raises ValueError on a malformed DataRow.");

static PyObject *
RowMasker_rows(RowMasker *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "rows() takes chunk, start and end");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    Py_ssize_t stop = PyLong_AsSsize_t(args[2]);
    if ((start == -1 || stop == -1) && PyErr_Occurred()) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (start < 0 || stop > view.len || start > stop) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "start/end out of range");
        return NULL;
    }
    const char *base = view.buf;
    const unsigned char *u = view.buf;
    Buf out = {NULL, 0, 0};
    int changed = 0;
    Py_ssize_t copied = start; /* input before this offset is already in out */
    Py_ssize_t p = start;
    PyObject *result = NULL;
    while (p < stop) {
        if (stop - p < 5) {
            malformed(p);
            goto done;
        }
        Py_ssize_t mend = p + 1 + (Py_ssize_t)get_u32(u + p + 1);
        if (mend < p + 5 || mend > stop) {
            malformed(p);
            goto done;
        }
        if (base[p] == 'D') {
            int row_changed = 0;
            Py_ssize_t mark;
            if (buf_add(&out, base + copied, p - copied) < 0)
                goto done;
            mark = out.len;
            if (rewrite_row(self, base, p + 5, mend, &out, p, &row_changed) < 0)
                goto done;
            if (row_changed) {
                changed = 1;
            }
            else {
                out.len = mark; /* unchanged: keep the original bytes instead */
                if (buf_add(&out, base + p, mend - p) < 0)
                    goto done;
            }
            copied = mend;
        }
        p = mend;
    }
    if (!changed) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (buf_add(&out, base + copied, stop - copied) < 0)
        goto done;
    result = PyBytes_FromStringAndSize(out.data, out.len);
done:
    PyMem_Free(out.data);
    PyBuffer_Release(&view);
    return result;
}

static PyObject *
RowMasker_get_counts(RowMasker *self, void *closure)
{
    PyObject *list = PyList_New(self->nops);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < self->nops; i++) {
        PyObject *n = PyLong_FromSsize_t(self->counts[i]);
        if (n == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, n);
    }
    return list;
}

static PyMethodDef RowMasker_methods[] = {
    {"rows", (PyCFunction)(void (*)(void))RowMasker_rows, METH_FASTCALL, RowMasker_rows_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef RowMasker_getset[] = {
    {"counts", (getter)RowMasker_get_counts, NULL,
     "values masked so far, per field (detector fields count 0)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RowMaskerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxies.postgres._speedups.RowMasker",
    .tp_basicsize = sizeof(RowMasker),
    .tp_dealloc = (destructor)RowMasker_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "RowMasker(ops): masks fields of DataRow messages, a run of them per call.",
    .tp_methods = RowMasker_methods,
    .tp_getset = RowMasker_getset,
    .tp_new = RowMasker_new,
};


/* ================================================================ fast shape
 *
 * The twin of keyturn.analysis.postgres.fast_shape (regular expressions there):
 * None when the text is not ASCII, is longer than max_len, or holds a quote, a
 * dollar, a backslash, a NUL, "--" or a slash-star; otherwise the text with every bare
 * number ((?<![\w$.])\d+(?:\.\d+)?(?![\w.])) replaced by "0".
 */

static inline int
is_word(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

static inline int
is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

/* Writes the shape into out (n bytes at most). Returns its length, or -1 if unsafe. */
static Py_ssize_t
shape_into(const unsigned char *s, Py_ssize_t n, char *out)
{
    Py_ssize_t o = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c & 0x80 || c == '\'' || c == '"' || c == '$' || c == '\\' || c == 0)
            return -1;
        if ((c == '-' && i + 1 < n && s[i + 1] == '-') || (c == '/' && i + 1 < n && s[i + 1] == '*'))
            return -1;
    }
    Py_ssize_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (is_digit(c) && (i == 0 || !(is_word(s[i - 1]) || s[i - 1] == '$' || s[i - 1] == '.'))) {
            Py_ssize_t j = i;
            while (j < n && is_digit(s[j]))
                j++;
            Py_ssize_t end = j;
            if (j + 1 < n && s[j] == '.' && is_digit(s[j + 1])) {
                end = j + 1;
                while (end < n && is_digit(s[end]))
                    end++;
            }
            if (end >= n || !(is_word(s[end]) || s[end] == '.')) {
                out[o++] = '0';
                i = end;
                continue;
            }
            /* no match here; the digits that follow cannot start one either */
            memcpy(out + o, s + i, j - i);
            o += j - i;
            i = j;
            continue;
        }
        out[o++] = (char)c;
        i++;
    }
    return o;
}

/* The shape as a str, Py_None (new ref) when unsafe, NULL on error. */
static PyObject *
shape_object(const unsigned char *s, Py_ssize_t n)
{
    PyObject *str = PyUnicode_New(n, 127);
    if (str == NULL)
        return NULL;
    Py_ssize_t len = shape_into(s, n, (char *)PyUnicode_1BYTE_DATA(str));
    if (len < 0) {
        Py_DECREF(str);
        return Py_NewRef(Py_None);
    }
    if (len == n)
        return str;
    PyObject *shorter = PyUnicode_FromStringAndSize((const char *)PyUnicode_1BYTE_DATA(str), len);
    Py_DECREF(str);
    return shorter;
}

PyDoc_STRVAR(fast_shape_doc,
"fast_shape(sql, max_len) -> str | None\n\n"
"The compiled twin of keyturn.analysis.postgres.fast_shape.");

static PyObject *
py_fast_shape(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "fast_shape(sql: str, max_len: int)");
        return NULL;
    }
    Py_ssize_t max_len = PyLong_AsSsize_t(args[1]);
    if (max_len == -1 && PyErr_Occurred())
        return NULL;
    PyObject *sql = args[0];
    if (PyUnicode_GET_LENGTH(sql) > max_len || !PyUnicode_IS_ASCII(sql))
        Py_RETURN_NONE;
    return shape_object(PyUnicode_1BYTE_DATA(sql), PyUnicode_GET_LENGTH(sql));
}

/* ================================================================ AuditBuffer
 *
 * The audit spool's pending lines (keyturn/auditspool.py, LineBuffer is the
 * Python twin). append() adds one JSON line; take() hands everything appended so
 * far to the spool's flusher, which writes it to the spool file. Both hold the
 * GIL while they touch the buffer (only on_full, below, may let other threads
 * run, after the line is complete), so a take() never sees half a line. The fast
 * path appends its lines here without a Python call.
 * When more than `limit` bytes are pending, append() calls on_full() (the spool
 * writes them out at once), so a stalled flusher cannot grow memory unbounded.
 */

typedef struct {
    PyObject_HEAD
    Buf buf;
    Py_ssize_t lines;   /* lines appended since creation */
    Py_ssize_t limit;
    PyObject *on_full;  /* callable or None */
    int flushing;       /* on_full() is running (it may append itself) */
} AuditBuffer;

static PyTypeObject AuditBufferType;

static int
AuditBuffer_traverse(AuditBuffer *self, visitproc visit, void *arg)
{
    Py_VISIT(self->on_full);
    return 0;
}

static int
AuditBuffer_clear(AuditBuffer *self)
{
    Py_CLEAR(self->on_full);
    return 0;
}

static void
AuditBuffer_dealloc(AuditBuffer *self)
{
    PyObject_GC_UnTrack(self);
    AuditBuffer_clear(self);
    PyMem_Free(self->buf.data);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
AuditBuffer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"limit", "on_full", NULL};
    Py_ssize_t limit = 1 << 20;
    PyObject *on_full = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|nO:AuditBuffer", kwlist, &limit, &on_full))
        return NULL;
    if (on_full != Py_None && !PyCallable_Check(on_full)) {
        PyErr_SetString(PyExc_TypeError, "on_full must be callable or None");
        return NULL;
    }
    AuditBuffer *self = (AuditBuffer *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->limit = limit;
    self->on_full = Py_NewRef(on_full);
    return (PyObject *)self;
}

/* After a line was added: count it, and let the spool write out a full buffer. */
static int
audit_buffer_added(AuditBuffer *self)
{
    self->lines++;
    if (self->buf.len > self->limit && self->on_full != NULL && self->on_full != Py_None &&
        !self->flushing) {
        self->flushing = 1;
        PyObject *r = PyObject_CallNoArgs(self->on_full);
        self->flushing = 0;
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    return 0;
}

static PyObject *
AuditBuffer_append(AuditBuffer *self, PyObject *line)
{
    if (!PyBytes_Check(line)) {
        PyErr_SetString(PyExc_TypeError, "line must be bytes");
        return NULL;
    }
    if (buf_add(&self->buf, PyBytes_AS_STRING(line), PyBytes_GET_SIZE(line)) < 0)
        return NULL;
    if (audit_buffer_added(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
AuditBuffer_take(AuditBuffer *self, PyObject *unused)
{
    PyObject *out = PyBytes_FromStringAndSize(self->buf.data, self->buf.len);
    if (out == NULL)
        return NULL;
    self->buf.len = 0;
    if (self->buf.cap > (4 << 20)) { /* give back what a burst took */
        PyMem_Free(self->buf.data);
        self->buf.data = NULL;
        self->buf.cap = 0;
    }
    return out;
}

static PyObject *
AuditBuffer_get_lines(AuditBuffer *self, void *closure)
{
    return PyLong_FromSsize_t(self->lines);
}

static PyObject *
AuditBuffer_get_size(AuditBuffer *self, void *closure)
{
    return PyLong_FromSsize_t(self->buf.len);
}

static PyMethodDef AuditBuffer_methods[] = {
    {"append", (PyCFunction)AuditBuffer_append, METH_O, "append(line: bytes): add one line"},
    {"take", (PyCFunction)AuditBuffer_take, METH_NOARGS,
     "take() -> bytes: everything appended since the last take()"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef AuditBuffer_getset[] = {
    {"lines", (getter)AuditBuffer_get_lines, NULL, "lines appended since creation", NULL},
    {"size", (getter)AuditBuffer_get_size, NULL, "bytes pending", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject AuditBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxies.postgres._speedups.AuditBuffer",
    .tp_basicsize = sizeof(AuditBuffer),
    .tp_dealloc = (destructor)AuditBuffer_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "AuditBuffer(limit=1 MiB, on_full=None): the audit spool's pending lines.",
    .tp_traverse = (traverseproc)AuditBuffer_traverse,
    .tp_clear = (inquiry)AuditBuffer_clear,
    .tp_methods = AuditBuffer_methods,
    .tp_getset = AuditBuffer_getset,
    .tp_new = AuditBuffer_new,
};

/* ================================================================ WriteAhead
 *
 * Group commit of the write-ahead audit. Every chunk a session sends to its target
 * must have its intent records handed to the OS first (one write to the spool file).
 * With many sessions, one event-loop turn carries chunks of several: the fast path
 * defers them here (defer()), and one callback at the end of the turn writes the
 * spool once (flush, the spool's flush_ahead) and then every deferred chunk, in the
 * order they were deferred. Nothing is sent before its records are written; when the
 * spool cannot be written, no deferred chunk is sent and each one's session is told
 * (owner.fast_failed(exc)), as when the fast path's own flush fails.
 *
 * Order: a chunk deferred for a target goes out before anything written to that
 * target later, because every other write to a target drains this first
 * (drain(): Upstream.write and Upstream.close), and the fast path defers every chunk
 * while anything is deferred. Re-entrant calls (a write's pause_writing, a session
 * failing) continue the same queue in order.
 *
 * This type must not decide what is written to the spool or when a statement may be
 * sent: it only moves the moment the chunks already decided go out.
 */

static PyObject *str_data_received, *str_fast_failed;

typedef struct {
    PyObject *owner; /* has fast_failed(exc) */
    PyObject *write; /* the target transport's write */
    PyObject *data;  /* bytes */
} Deferred;

typedef struct {
    PyObject_HEAD
    PyObject *flush;     /* the spool's flush_ahead() */
    PyObject *schedule;  /* loop.call_soon */
    Deferred *q;
    Py_ssize_t head, tail, cap;
    Py_ssize_t flushed;  /* q[head:flushed] had their records written */
    int scheduled;       /* a callback is due */
    long long turns, chunks;
} WriteAhead;

static PyTypeObject WriteAheadType;

static void
deferred_clear(Deferred *d)
{
    Py_CLEAR(d->owner);
    Py_CLEAR(d->write);
    Py_CLEAR(d->data);
}

static int
WriteAhead_traverse(WriteAhead *self, visitproc visit, void *arg)
{
    Py_VISIT(self->flush);
    Py_VISIT(self->schedule);
    for (Py_ssize_t i = self->head; i < self->tail; i++) {
        Py_VISIT(self->q[i].owner);
        Py_VISIT(self->q[i].write);
    }
    return 0;
}

static int
WriteAhead_clear(WriteAhead *self)
{
    Py_CLEAR(self->flush);
    Py_CLEAR(self->schedule);
    for (Py_ssize_t i = self->head; i < self->tail; i++)
        deferred_clear(&self->q[i]);
    self->head = self->tail = self->flushed = 0;
    return 0;
}

static void
WriteAhead_dealloc(WriteAhead *self)
{
    PyObject_GC_UnTrack(self);
    WriteAhead_clear(self);
    PyMem_Free(self->q);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
WriteAhead_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"flush", "schedule", NULL};
    PyObject *flush, *schedule;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO:WriteAhead", kwlist, &flush, &schedule))
        return NULL;
    if (!PyCallable_Check(flush) || !PyCallable_Check(schedule)) {
        PyErr_SetString(PyExc_TypeError, "flush and schedule must be callable");
        return NULL;
    }
    WriteAhead *self = (WriteAhead *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->flush = Py_NewRef(flush);
    self->schedule = Py_NewRef(schedule);
    return (PyObject *)self;
}

/* Queue one chunk; the first one of a turn schedules the callback. */
static int
write_ahead_defer(WriteAhead *self, PyObject *owner, PyObject *write, PyObject *data)
{
    if (self->head == self->tail)
        self->head = self->tail = self->flushed = 0;
    if (self->tail == self->cap) {
        Py_ssize_t cap = self->cap ? self->cap * 2 : 64;
        Deferred *q = PyMem_Realloc(self->q, cap * sizeof(Deferred));
        if (q == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->q = q;
        self->cap = cap;
    }
    if (!self->scheduled) {
        PyObject *r = PyObject_CallOneArg(self->schedule, (PyObject *)self);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        self->scheduled = 1;
    }
    Deferred *d = &self->q[self->tail++];
    d->owner = Py_NewRef(owner);
    d->write = Py_NewRef(write);
    d->data = Py_NewRef(data);
    self->chunks++;
    return 0;
}

/* The exception being raised, normalised, with its traceback; the indicator cleared. */
static PyObject *
take_exception(void)
{
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (tb != NULL && exc != NULL)
        PyException_SetTraceback(exc, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return exc != NULL ? exc : Py_NewRef(Py_None);
}

/* Tell a deferred chunk's session that it failed; -1 only for a non-Exception. */
static int
deferred_failed(Deferred *d, PyObject *exc)
{
    PyObject *r = PyObject_CallMethodOneArg(d->owner, str_fast_failed, exc);
    if (r == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return -1;
        PyErr_WriteUnraisable(d->owner);
        return 0;
    }
    Py_DECREF(r);
    return 0;
}

/* Write the spool, then every deferred chunk, in order. */
static int
write_ahead_run(WriteAhead *self)
{
    while (self->head < self->tail) {
        if (self->head >= self->flushed) {
            Py_ssize_t upto = self->tail;
            PyObject *r = PyObject_CallNoArgs(self->flush);
            if (r == NULL) {
                if (!PyErr_ExceptionMatches(PyExc_Exception))
                    return -1;
                /* none of them goes out: take them all off first (their sessions end,
                   which drains again) */
                PyObject *exc = take_exception();
                Py_ssize_t n = self->tail - self->head;
                Deferred *failed = PyMem_Malloc((n ? n : 1) * sizeof(Deferred));
                if (failed == NULL) {
                    Py_DECREF(exc);
                    PyErr_NoMemory();
                    return -1;
                }
                memcpy(failed, self->q + self->head, n * sizeof(Deferred));
                self->head = self->tail = self->flushed = 0;
                int rc = 0;
                for (Py_ssize_t i = 0; i < n; i++) {
                    if (rc == 0 && deferred_failed(&failed[i], exc) < 0)
                        rc = -1;
                    deferred_clear(&failed[i]);
                }
                PyMem_Free(failed);
                Py_DECREF(exc);
                if (rc < 0)
                    return -1;
                continue;
            }
            Py_DECREF(r);
            self->turns++;
            if (upto > self->flushed)
                self->flushed = upto;
        }
        Deferred d = self->q[self->head++];
        PyObject *r = PyObject_CallOneArg(d.write, d.data);
        if (r == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                deferred_clear(&d);
                return -1;
            }
            /* a transport closed under it: its session ends (a no-op if it ended) */
            PyObject *exc = take_exception();
            int rc = deferred_failed(&d, exc);
            Py_DECREF(exc);
            deferred_clear(&d);
            if (rc < 0)
                return -1;
            continue;
        }
        Py_DECREF(r);
        deferred_clear(&d);
    }
    self->head = self->tail = self->flushed = 0;
    return 0;
}

static PyObject *
WriteAhead_call(WriteAhead *self, PyObject *args, PyObject *kwds)
{
    self->scheduled = 0;
    if (write_ahead_run(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
WriteAhead_drain(WriteAhead *self, PyObject *unused)
{
    if (self->head < self->tail && write_ahead_run(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
WriteAhead_defer(WriteAhead *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyBytes_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "defer(owner, write, data: bytes)");
        return NULL;
    }
    if (write_ahead_defer(self, args[0], args[1], args[2]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
WriteAhead_get_pending(WriteAhead *self, void *closure)
{
    return PyLong_FromSsize_t(self->tail - self->head);
}

static PyObject *
WriteAhead_get_stats(WriteAhead *self, void *closure)
{
    return Py_BuildValue("(LL)", self->turns, self->chunks);
}

static PyMethodDef WriteAhead_methods[] = {
    {"defer", (PyCFunction)(void (*)(void))WriteAhead_defer, METH_FASTCALL,
     "defer(owner, write, data): send data with write() once its records are written"},
    {"drain", (PyCFunction)WriteAhead_drain, METH_NOARGS,
     "drain(): write the spool and every deferred chunk now"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef WriteAhead_getset[] = {
    {"pending", (getter)WriteAhead_get_pending, NULL, "chunks deferred, not yet sent", NULL},
    {"stats", (getter)WriteAhead_get_stats, NULL,
     "(spool writes, chunks deferred) since creation", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject WriteAheadType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxies.postgres._speedups.WriteAhead",
    .tp_basicsize = sizeof(WriteAhead),
    .tp_dealloc = (destructor)WriteAhead_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "WriteAhead(flush, schedule): group commit of the write-ahead audit.",
    .tp_traverse = (traverseproc)WriteAhead_traverse,
    .tp_clear = (inquiry)WriteAhead_clear,
    .tp_call = (ternaryfunc)WriteAhead_call,
    .tp_methods = WriteAhead_methods,
    .tp_getset = WriteAhead_getset,
    .tp_new = WriteAhead_new,
};

/* ================================================================ FastPath
 *
 * The relay's common case in one call per network chunk: simple Queries whose
 * shape the session already allowed (the verdicts dict), Bind/Execute/Sync of
 * prepared statements the session already allowed as reads (the statements
 * dict), and Parse of the unnamed statement with a text (and parameter types)
 * the session already allowed as a read (the parses dict: what drivers send for
 * a parameterised query), with the target's ordinary answers (ParseComplete,
 * RowDescription, DataRow, CommandComplete, BindComplete, ReadyForQuery). Audit lines for these are built
 * here, from pieces the session passes in (its prefix, the decision fragments and
 * the layout's keys, all built by keyturn.auditschema): no field name is spelled
 * in this file. Anything else (an error, a notice, a message of another type, a chunk
 * not made of whole messages, more than MAX_BATCH messages) makes client() or
 * server() return False having changed nothing, and the session handles the
 * chunk in Python after taking the pending entries over with drain().
 */

#define MAX_BATCH 32
#define MAX_HIDDEN 64 /* the guard's own CommandCompletes in one chunk from the target */
#define HIDE_BITS ((int)(8 * sizeof(unsigned long)))

/* The keys of a fast-path audit line after the session's prefix, in the order written
   (FastPath's `layout` argument, proxies/postgres/state.py FAST_AUDIT_LAYOUT): */
enum {
    KEY_AT,     /* the time key, right after the prefix */
    KEY_TEXT,   /* ,"<text key>": before the statement's text */
    KEY_DONE,   /* ,"<outcome key>":"ok","<duration key>": of a completed statement */
    KEY_COUNT,  /* ,"<count key>": its row count */
    KEY_N,      /* ,"<intent number key>": */
    KEYS        /* how many there are (the module's AUDIT_LAYOUT_KEYS) */
};
#define KEY_MAX 48 /* bytes per key piece at most: see audit_line's buffer */

typedef struct {
    char kind;          /* 'Q', 'P', 'B', 'E', 'S', 'D' (Describe of the unnamed portal) */
    PyObject *decision; /* Q, E: the Decision; P: what the name held before, or NULL */
    PyObject *fragment; /* Q, E: "classification":…,"action":…,"rule":…,"reason":… */
    PyObject *raw;      /* Q: the chunk holding the text; E: the statement's JSON string */
    PyObject *sql;      /* E: the statement text (str); P: the session's StmtInfo */
    Py_ssize_t off, len;/* Q: the statement text in raw */
    double t0;
    long long rows;     /* -1: none */
    PyObject *tag;      /* the CommandComplete tag (bytes) once seen */
    long long n;        /* the number of its intent record (odd: written here), 0: none */
    PyObject *plan;     /* Q sent with the read-only guard's statements: its plan (see
                           the guarded dict), else NULL */
    unsigned long hide; /* with plan: bit i set when the Query's i-th CommandComplete
                           answers a statement of the guard's own (not forwarded) */
    int ci;             /* with plan: CommandCompletes of the Query seen so far;
                           G: answers of the guard statement seen (BindComplete,
                           CommandComplete, CloseComplete) */
    char status;        /* Q with plan, S after a guarded Execute: the status its
                           ReadyForQuery must show (0: the session's) */
    PyObject *params;   /* E of a guarded statement whose audit shows its parameters: the
                           list (for drain()), else NULL */
} Entry;

typedef struct {
    PyObject_HEAD
    PyObject *session;
    PyObject *verdicts;      /* str shape -> (Decision, fragment bytes) */
    PyObject *stmts;         /* bytes name -> (Decision, fragment, sql JSON bytes, sql str, name str[, info]) */
    PyObject *parses;        /* bytes Parse body after the (empty) name -> the same 6-tuple
                                with the session's StmtInfo last; NULL: no Parse here */
    PyObject *pystmts;       /* the session's statements (str name -> StmtInfo) */
    PyObject *bound;         /* the session's portals as bound: str -> (Bind body, StmtInfo) */
    PyObject *guarded;       /* str shape -> (Decision, fragment, plans): statements the
                                read-only guard plans (writes, BEGIN/COMMIT, reads inside a
                                transaction); plans[i] for the guard's state i (0 no
                                transaction, 1 in one, 2 in one with the read-only
                                savepoint open) is None (Python's) or (prefix bytes, suffix
                                bytes, hide mask, block after, savepoint open after,
                                status after, parts); NULL: none here */
    PyObject *gparses;       /* bytes Parse body after the (empty) name -> the gstmts tuple
                                of a statement the guard plans; NULL: none here */
    PyObject *gstmts;        /* bytes name -> the stmts tuple and (plans, with parameters,
                                detail key): prepared statements the guard plans
                                (plans[state]: None, or (the guard's Bind/Execute/Close
                                messages before the Execute, their statement names, the
                                same after it, block after, savepoint open after, status
                                at the Sync)); NULL: none here */
    PyObject *portals;       /* the session's portals: str -> (statement name, Bind body) */
    PyObject *client_write;
    PyObject *upstream_write;
    PyObject *audit_write;   /* a callable, or the AuditBuffer itself (appended to in C) */
    PyObject *prefix;        /* bytes: the session's part of every record, up to a comma */
    PyObject *iprefix;       /* the same for intent records, or None: no intents */
    PyObject *flush;         /* called after intents, before the chunk goes upstream; or a
                                WriteAhead, which sends the chunk after one spool write
                                for the loop turn */
    PyObject *layout;        /* tuple of KEYS bytes: the line's keys (see KEY_AT) */
    const char *key[KEYS];   /* their bytes (owned by layout) */
    Py_ssize_t key_len[KEYS];
    long long next_n;        /* intent numbers written here: 1, 3, 5... (Python: even) */
    Py_ssize_t max_len;      /* longest text with a shape */
    Entry *q;
    Py_ssize_t head, tail, cap;
    int armed;               /* see Relay: the last client chunk went the fast way */
} FastPath;

static PyObject *str_tx_status, *str_I, *str_T, *str_E, *str_empty, *bytes_empty;
static PyObject *str_txs, *str_block, *str_block_ro, *str_ro_open, *str_hold;
static PyObject *str_changed_catalog, *str_changes_anything, *str_guard_stmts;

static int audit_line(FastPath *self, Entry *e, double now, int intent);
static int json_ascii(Buf *b, const char *s, Py_ssize_t n);

static void
entry_clear(Entry *e)
{
    Py_CLEAR(e->decision);
    Py_CLEAR(e->fragment);
    Py_CLEAR(e->raw);
    Py_CLEAR(e->sql);
    Py_CLEAR(e->tag);
    Py_CLEAR(e->plan);
    Py_CLEAR(e->params);
}

static int
FastPath_traverse(FastPath *self, visitproc visit, void *arg)
{
    Py_VISIT(self->session);
    Py_VISIT(self->verdicts);
    Py_VISIT(self->stmts);
    Py_VISIT(self->parses);
    Py_VISIT(self->pystmts);
    Py_VISIT(self->bound);
    Py_VISIT(self->portals);
    Py_VISIT(self->guarded);
    Py_VISIT(self->gstmts);
    Py_VISIT(self->gparses);
    Py_VISIT(self->client_write);
    Py_VISIT(self->upstream_write);
    Py_VISIT(self->audit_write);
    Py_VISIT(self->flush);
    for (Py_ssize_t i = self->head; i < self->tail; i++) {
        Py_VISIT(self->q[i].decision);
        Py_VISIT(self->q[i].sql);
        Py_VISIT(self->q[i].plan);
        Py_VISIT(self->q[i].params);
    }
    return 0;
}

static int
FastPath_clear(FastPath *self)
{
    Py_CLEAR(self->session);
    Py_CLEAR(self->verdicts);
    Py_CLEAR(self->stmts);
    Py_CLEAR(self->parses);
    Py_CLEAR(self->pystmts);
    Py_CLEAR(self->bound);
    Py_CLEAR(self->portals);
    Py_CLEAR(self->guarded);
    Py_CLEAR(self->gstmts);
    Py_CLEAR(self->gparses);
    Py_CLEAR(self->client_write);
    Py_CLEAR(self->upstream_write);
    Py_CLEAR(self->audit_write);
    Py_CLEAR(self->prefix);
    Py_CLEAR(self->iprefix);
    Py_CLEAR(self->flush);
    Py_CLEAR(self->layout);
    for (Py_ssize_t i = self->head; i < self->tail; i++)
        entry_clear(&self->q[i]);
    self->head = self->tail = 0;
    return 0;
}

static void
FastPath_dealloc(FastPath *self)
{
    PyObject_GC_UnTrack(self);
    FastPath_clear(self);
    PyMem_Free(self->q);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
FastPath_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"session", "verdicts", "stmts", "portals", "client_write",
                             "upstream_write", "audit_write", "prefix", "layout", "max_len",
                             "intent_prefix", "flush", "parses", "session_stmts", "bound",
                             "guarded", "guarded_stmts", "guarded_parses", NULL};
    PyObject *session, *verdicts, *stmts, *portals, *cw, *uw, *aw, *prefix, *layout;
    PyObject *iprefix = Py_None, *flush = Py_None, *parses = NULL, *pystmts = NULL;
    PyObject *bound = NULL, *guarded = NULL, *gstmts = NULL, *gparses = NULL;
    Py_ssize_t max_len;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO!O!O!OOOSO!n|OOO!O!O!O!O!O!:FastPath", kwlist,
                                     &session, &PyDict_Type, &verdicts, &PyDict_Type, &stmts,
                                     &PyDict_Type, &portals, &cw, &uw, &aw, &prefix,
                                     &PyTuple_Type, &layout, &max_len, &iprefix, &flush,
                                     &PyDict_Type, &parses, &PyDict_Type, &pystmts,
                                     &PyDict_Type, &bound, &PyDict_Type, &guarded,
                                     &PyDict_Type, &gstmts, &PyDict_Type, &gparses))
        return NULL;
    if ((parses == NULL) != (pystmts == NULL)) {
        PyErr_SetString(PyExc_TypeError, "parses and session_stmts go together");
        return NULL;
    }
    if (iprefix != Py_None && !PyBytes_Check(iprefix)) {
        PyErr_SetString(PyExc_TypeError, "intent_prefix must be bytes or None");
        return NULL;
    }
    if (PyTuple_GET_SIZE(layout) != KEYS) {
        PyErr_Format(PyExc_ValueError, "layout must hold %d key pieces", KEYS);
        return NULL;
    }
    for (int i = 0; i < KEYS; i++) {
        PyObject *piece = PyTuple_GET_ITEM(layout, i);
        if (!PyBytes_Check(piece) || PyBytes_GET_SIZE(piece) > KEY_MAX) {
            PyErr_Format(PyExc_ValueError, "layout pieces must be bytes of at most %d",
                         KEY_MAX);
            return NULL;
        }
    }
    FastPath *self = (FastPath *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->session = Py_NewRef(session);
    self->verdicts = Py_NewRef(verdicts);
    self->stmts = Py_NewRef(stmts);
    self->parses = Py_XNewRef(parses);
    self->pystmts = Py_XNewRef(pystmts);
    self->bound = Py_XNewRef(bound);
    self->guarded = Py_XNewRef(guarded);
    self->gstmts = Py_XNewRef(gstmts);
    self->gparses = Py_XNewRef(gparses);
    self->portals = Py_NewRef(portals);
    self->client_write = Py_NewRef(cw);
    self->upstream_write = Py_NewRef(uw);
    if (PyCFunction_Check(aw) && PyCFunction_GET_SELF(aw) != NULL &&
        Py_IS_TYPE(PyCFunction_GET_SELF(aw), &AuditBufferType) &&
        PyCFunction_GET_FUNCTION(aw) == (PyCFunction)AuditBuffer_append)
        aw = PyCFunction_GET_SELF(aw); /* its append(): add lines without a call */
    self->audit_write = Py_NewRef(aw);
    self->prefix = Py_NewRef(prefix);
    self->iprefix = Py_NewRef(iprefix);
    self->flush = Py_NewRef(flush);
    self->layout = Py_NewRef(layout);
    for (int i = 0; i < KEYS; i++) {
        self->key[i] = PyBytes_AS_STRING(PyTuple_GET_ITEM(layout, i));
        self->key_len[i] = PyBytes_GET_SIZE(PyTuple_GET_ITEM(layout, i));
    }
    self->next_n = 1;
    self->max_len = max_len;
    self->cap = 16;
    self->q = PyMem_Calloc(self->cap, sizeof(Entry));
    if (self->q == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static Entry *
push(FastPath *self)
{
    if (self->head == self->tail)
        self->head = self->tail = 0;
    if (self->tail == self->cap) {
        if (self->head > 0) {
            memmove(self->q, self->q + self->head, (self->tail - self->head) * sizeof(Entry));
            self->tail -= self->head;
            self->head = 0;
        }
        else {
            Entry *q = PyMem_Realloc(self->q, 2 * self->cap * sizeof(Entry));
            if (q == NULL) {
                PyErr_NoMemory();
                return NULL;
            }
            self->q = q;
            self->cap *= 2;
        }
    }
    Entry *e = &self->q[self->tail++];
    memset(e, 0, sizeof(Entry));
    e->rows = -1;
    return e;
}

static double
now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- client -> target */

typedef struct {
    char type;
    Py_ssize_t start, end;   /* the whole message */
    PyObject *verdict;       /* Q: (Decision, fragment[, plans]); B, E: the stmt entry */
    PyObject *gplan;         /* Q planned by the read-only guard: its plan (borrowed from
                                verdict); B, E of a guarded prepared statement: the
                                guard's plan for it (borrowed); else NULL */
    PyObject *params;        /* B, E of a guarded statement: its audit's parameters (owned
                                list), else NULL */
    PyObject *frag;          /* the same: its fragment with them (owned bytes), else NULL */
} Planned;

/* An attribute as a truth value: 1, 0, or -1 on error. */
static int
attr_true(PyObject *obj, PyObject *name)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* The read-only guard's state (session.txs, guard.TxState): 0 no transaction, 1 in one,
   2 in one with the read-only savepoint open, 3 anything else (a READ ONLY transaction, a
   WITH HOLD cursor: Python's). *quiet: a read may go as it is (the session's
   _guard_quiet). -1 on error. */
static int
guard_state(FastPath *self, int *quiet)
{
    PyObject *txs = PyObject_GetAttr(self->session, str_txs);
    if (txs == NULL)
        return -1;
    int block = attr_true(txs, str_block), ro = attr_true(txs, str_ro_open);
    int bro = attr_true(txs, str_block_ro), hold = attr_true(txs, str_hold);
    Py_DECREF(txs);
    if (block < 0 || ro < 0 || bro < 0 || hold < 0)
        return -1;
    *quiet = !block || ro || bro;
    if (bro || hold)
        return 3;
    return !block ? 0 : ro ? 2 : 1;
}

/* str.isspace() for an ASCII character */
static inline int
py_space(unsigned char c)
{
    return (c >= 9 && c <= 13) || (c >= 0x1c && c <= 0x20);
}

/* The session agrees with a guard plan for state gstate: its transaction status says
   the same, and no catalog change waits for the Python path's bookkeeping. 1 yes,
   0 no, -1 error. */
static int
session_agrees(FastPath *self, int gstate)
{
    PyObject *cur = PyObject_GetAttr(self->session, str_tx_status);
    if (cur == NULL)
        return -1;
    int status = PyUnicode_Check(cur) && PyUnicode_GET_LENGTH(cur) == 1
                 ? (int)PyUnicode_READ_CHAR(cur, 0) : 0;
    Py_DECREF(cur);
    if (status != (gstate == 0 ? 'I' : 'T'))
        return 0;
    int a = attr_true(self->session, str_changed_catalog);
    if (a != 0)
        return a < 0 ? -1 : 0;
    a = attr_true(self->session, str_changes_anything);
    return a < 0 ? -1 : !a;
}

static const char *
cstr_end(const char *p, const char *end)
{
    const char *z = memchr(p, 0, end - p);
    return z;
}

/* dict[bytes(p, n)] as a borrowed reference in *out: 1 found, 0 not, -1 error. */
static int
lookup_bytes(PyObject *dict, const char *p, Py_ssize_t n, PyObject **out)
{
    PyObject *key = PyBytes_FromStringAndSize(p, n);
    if (key == NULL)
        return -1;
    *out = PyDict_GetItemWithError(dict, key);
    Py_DECREF(key);
    if (*out == NULL)
        return PyErr_Occurred() ? -1 : 0;
    return 1;
}

/* A guarded Bind's parameters as its audit shows them (the session's _bind_params),
   from ``p`` (just after the statement name) to ``bend``: every one in text format and
   ASCII (anything else is Python's). *params: a list of str / None (NULL when there are
   none); *frag: ``fragment`` with ``key`` and the list as JSON. 1 done, 0 not here, -1
   error. */
static int
bind_params(const unsigned char *p, const unsigned char *bend, PyObject *fragment,
            PyObject *key, PyObject **params, PyObject **frag)
{
    *params = *frag = NULL;
    if (bend - p < 2)
        return 0;
    int nf = (p[0] << 8) | p[1];
    p += 2;
    if (nf & 0x8000 || bend - p < 2 * (Py_ssize_t)nf)
        return 0;
    for (int i = 0; i < nf; i++)
        if (p[2 * i] || p[2 * i + 1])
            return 0; /* a binary parameter */
    p += 2 * nf;
    if (bend - p < 2)
        return 0;
    int np = (p[0] << 8) | p[1];
    p += 2;
    if (np & 0x8000 || (nf > 1 && nf != np))
        return 0;
    if (np == 0) {
        /* nothing to show; the rest must still be a well-formed Bind */
        if (bend - p < 2)
            return 0;
        int nr = (p[0] << 8) | p[1];
        return (nr & 0x8000) == 0 && bend - p == 2 + 2 * (Py_ssize_t)nr;
    }
    PyObject *list = PyList_New(np);
    if (list == NULL)
        return -1;
    Buf b = {NULL, 0, 0};
    int rc = -1;
    if (buf_add(&b, PyBytes_AS_STRING(fragment), PyBytes_GET_SIZE(fragment)) < 0 ||
        buf_add(&b, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)) < 0 ||
        buf_add(&b, "[", 1) < 0)
        goto done;
    for (int i = 0; i < np; i++) {
        if (bend - p < 4) {
            rc = 0;
            goto done;
        }
        int32_t len = (int32_t)get_u32(p);
        p += 4;
        if (i && buf_add(&b, ",", 1) < 0)
            goto done;
        if (len == -1) {
            PyList_SET_ITEM(list, i, Py_NewRef(Py_None));
            if (buf_add(&b, "null", 4) < 0)
                goto done;
            continue;
        }
        if (len < 0 || bend - p < len || !is_ascii(p, len)) {
            rc = 0;
            goto done;
        }
        PyObject *v = PyUnicode_DecodeASCII((const char *)p, len, "strict");
        if (v == NULL)
            goto done;
        PyList_SET_ITEM(list, i, v);
        if (json_ascii(&b, (const char *)p, len) < 0)
            goto done;
        p += len;
    }
    if (bend - p < 2) {
        rc = 0;
        goto done;
    }
    int nr = (p[0] << 8) | p[1];
    if (nr & 0x8000 || bend - p != 2 + 2 * (Py_ssize_t)nr) {
        rc = 0;
        goto done;
    }
    if (buf_add(&b, "]}", 2) < 0)
        goto done;
    *frag = PyBytes_FromStringAndSize(b.data, b.len);
    if (*frag == NULL)
        goto done;
    *params = list;
    list = NULL;
    rc = 1;
done:
    Py_XDECREF(list);
    PyMem_Free(b.data);
    return rc;
}

/* Whether every name in ``names`` (a tuple of str) is in the session's guard_stmts: the
   guard's statements the target has prepared. 1 yes, 0 no, -1 error. */
static int
guard_prepared(FastPath *self, PyObject *names)
{
    if (PyTuple_GET_SIZE(names) == 0)
        return 1;
    PyObject *have = PyObject_GetAttr(self->session, str_guard_stmts);
    if (have == NULL)
        return -1;
    int rc = PyAnySet_Check(have) ? 1 : 0;
    for (Py_ssize_t i = 0; rc == 1 && i < PyTuple_GET_SIZE(names); i++)
        rc = PySet_Contains(have, PyTuple_GET_ITEM(names, i));
    Py_DECREF(have);
    return rc;
}

/* The read-only guard's state after a statement it planned (session.txs.block and
   .ro_open, as the session's own planning leaves them): 0, or -1 on error. */
static int
set_guard_state(FastPath *self, PyObject *block, PyObject *ro_open)
{
    PyObject *txs = PyObject_GetAttr(self->session, str_txs);
    if (txs == NULL)
        return -1;
    int rc = PyObject_SetAttr(txs, str_block, block);
    if (rc == 0)
        rc = PyObject_SetAttr(txs, str_ro_open, ro_open);
    Py_DECREF(txs);
    return rc;
}

/* del dict[key] if it is there: 0, or -1 on error. */
static int
dict_discard(PyObject *dict, PyObject *key)
{
    if (PyDict_DelItem(dict, key) == 0)
        return 0;
    if (!PyErr_ExceptionMatches(PyExc_KeyError))
        return -1;
    PyErr_Clear();
    return 0;
}

/* One entry (G) for each of the guard's statements ``names`` (their Bind, Execute and
   Close are answered to the gateway alone). */
static int
push_guard(FastPath *self, PyObject *names, double t0)
{
    for (Py_ssize_t g = 0; g < PyTuple_GET_SIZE(names); g++) {
        Entry *ge = push(self);
        if (ge == NULL)
            return -1;
        ge->kind = 'G';
        ge->t0 = t0;
    }
    return 0;
}

/* In FastPath_client: a check that answers 1 (go on), 0 (not for the fast path) or -1
   (an error). */
#define CHECK_OR_BAIL(expr) do { int rc_ = (expr); if (rc_ < 0) goto fail; \
                                 if (rc_ == 0) goto bail; } while (0)

PyDoc_STRVAR(client_doc,
"client(chunk) -> bool\n\n"
"Forward a chunk from the client if every message in it is one the fast path\n"
"handles; False (nothing done) otherwise.");

static PyObject *
FastPath_client(FastPath *self, PyObject *chunk)
{
    if (!PyBytes_Check(chunk)) {
        PyErr_SetString(PyExc_TypeError, "chunk must be bytes");
        return NULL;
    }
    const char *base = PyBytes_AS_STRING(chunk);
    const unsigned char *u = (const unsigned char *)base;
    Py_ssize_t n = PyBytes_GET_SIZE(chunk);
    Planned plan[MAX_BATCH];
    for (int i = 0; i < MAX_BATCH; i++) {
        plan[i].verdict = NULL; /* owned references, released on every way out */
        plan[i].gplan = NULL;
        plan[i].params = plan[i].frag = NULL;
    }
    Planned *bound_pl = NULL; /* the Bind that bound the unnamed portal in this chunk */
    int parsed_guarded = 0;   /* what parsed holds is a statement the guard plans */
    int guarded = 0;          /* a guarded prepared statement was bound in this chunk */
    int guarded_e = -1;       /* ... and the index of its Execute */
    int count = 0;
    PyObject *result = NULL;
    PyObject *built = NULL; /* a Query rewritten with the guard's statements */
    PyObject *bound = NULL; /* the statement a Bind in this chunk bound to the unnamed portal */
    PyObject *parsed = NULL; /* what a Parse in this chunk put under the unnamed statement */
    Py_ssize_t p = 0;
    if (n == 0)
        goto bail;
    int quiet = 1;
    int gstate = guard_state(self, &quiet);
    if (gstate < 0)
        goto fail;
    /* First pass: decide, change nothing. */
    while (p < n) {
        if (n - p < 5 || count == MAX_BATCH)
            goto bail;
        if (!quiet && base[p] != 'Q' && (self->gstmts == NULL || gstate < 1 || gstate > 2))
            goto bail; /* a read inside a read-write transaction: the savepoint first */
        uint32_t length = get_u32(u + p + 1);
        if (length < 4 || (Py_ssize_t)length > n - p - 1)
            goto bail;
        Py_ssize_t end = p + 1 + length;
        const char *body = base + p + 5, *bend = base + end;
        Planned *pl = &plan[count];
        pl->type = base[p];
        pl->start = p;
        pl->end = end;
        pl->verdict = NULL;
        switch (base[p]) {
        case 'Q': {
            Py_ssize_t tlen = bend - body - 1;
            if (tlen < 0 || bend[-1] != 0 || tlen > self->max_len)
                goto bail;
            PyObject *shape = shape_object((const unsigned char *)body, tlen);
            if (shape == NULL)
                goto fail;
            if (shape == Py_None) {
                Py_DECREF(shape);
                goto bail;
            }
            PyObject *hit = PyDict_GetItemWithError(self->verdicts, shape);
            if (hit == NULL && PyErr_Occurred()) {
                Py_DECREF(shape);
                goto fail;
            }
            if (hit != NULL && quiet) {
                Py_DECREF(shape);
                if (!PyTuple_Check(hit) || PyTuple_GET_SIZE(hit) != 2 ||
                    !PyBytes_Check(PyTuple_GET_ITEM(hit, 1)))
                    goto bail;
                pl->verdict = Py_NewRef(hit);
                break;
            }
            /* A statement the read-only guard plans: alone in its chunk, with nothing
               else in flight, in a state the plans cover. */
            if (self->guarded == NULL || p != 0 || end != n || self->head != self->tail ||
                gstate > 2) {
                Py_DECREF(shape);
                goto bail;
            }
            hit = PyDict_GetItemWithError(self->guarded, shape);
            Py_DECREF(shape);
            if (hit == NULL) {
                if (PyErr_Occurred())
                    goto fail;
                goto bail;
            }
            if (!PyTuple_Check(hit) || PyTuple_GET_SIZE(hit) != 3 ||
                !PyBytes_Check(PyTuple_GET_ITEM(hit, 1)) ||
                !PyTuple_Check(PyTuple_GET_ITEM(hit, 2)) ||
                PyTuple_GET_SIZE(PyTuple_GET_ITEM(hit, 2)) != 3)
                goto bail;
            PyObject *gp = PyTuple_GET_ITEM(PyTuple_GET_ITEM(hit, 2), gstate);
            if (!PyTuple_Check(gp) || PyTuple_GET_SIZE(gp) != 7 ||
                !PyBytes_Check(PyTuple_GET_ITEM(gp, 0)) ||
                !PyBytes_Check(PyTuple_GET_ITEM(gp, 1)) ||
                !PyLong_Check(PyTuple_GET_ITEM(gp, 2)) ||
                !PyUnicode_Check(PyTuple_GET_ITEM(gp, 5)) ||
                PyUnicode_GET_LENGTH(PyTuple_GET_ITEM(gp, 5)) != 1)
                goto bail;
            CHECK_OR_BAIL(session_agrees(self, gstate));
            pl->verdict = Py_NewRef(hit);
            pl->gplan = gp;
            break;
        }
        case 'P': {
            /* the unnamed statement, with a body (text, parameter types) the session
               allowed before: the same bytes are read the same way by the target (a
               change of search_path, catalog or policy empties the dict) */
            if (self->parses == NULL || bend - body < 4 || body[0] != 0)
                goto bail;
            PyObject *st = NULL;
            int found = 0;
            if (quiet) {
                found = lookup_bytes(self->parses, body + 1, bend - body - 1, &st);
                if (found < 0)
                    goto fail;
            }
            if (found == 0 && self->gparses != NULL && self->gstmts != NULL) {
                /* one the read-only guard plans (see case 'B'): the Bind decides */
                found = lookup_bytes(self->gparses, body + 1, bend - body - 1, &st);
                if (found < 0)
                    goto fail;
                if (found == 0 || !PyTuple_Check(st) || PyTuple_GET_SIZE(st) != 9 ||
                    !PyUnicode_Check(PyTuple_GET_ITEM(st, 4)) ||
                    PyUnicode_GET_LENGTH(PyTuple_GET_ITEM(st, 4)) != 0)
                    goto bail;
                pl->verdict = Py_NewRef(st);
                parsed = st;
                parsed_guarded = 1;
                break;
            }
            if (found == 0 || !PyTuple_Check(st) || PyTuple_GET_SIZE(st) != 6 ||
                !PyBytes_Check(PyTuple_GET_ITEM(st, 1)) || !PyBytes_Check(PyTuple_GET_ITEM(st, 2))
                || !PyUnicode_Check(PyTuple_GET_ITEM(st, 3))
                || !PyUnicode_Check(PyTuple_GET_ITEM(st, 4))
                || PyUnicode_GET_LENGTH(PyTuple_GET_ITEM(st, 4)) != 0)
                goto bail;
            pl->verdict = Py_NewRef(st);
            parsed = st;
            parsed_guarded = 0;
            break;
        }
        case 'B': {
            const char *z = cstr_end(body, bend);
            if (z == NULL || z != body) /* only the unnamed portal */
                goto bail;
            const char *name = z + 1;
            const char *z2 = cstr_end(name, bend);
            if (z2 == NULL)
                goto bail;
            PyObject *st = NULL;
            int found = 0, planned = 0;
            if (z2 == name && parsed != NULL) {
                st = parsed; /* the unnamed statement parsed earlier in this chunk */
                found = 1;
                planned = parsed_guarded;
            }
            else {
                if (z2 == name) {
                    /* A Parse of the unnamed statement sent in an earlier batch and not
                       answered yet: to the session a Bind of it is ambiguous
                       (_bind_target), so it is the session's to refuse. */
                    for (Py_ssize_t i = self->head; i < self->tail; i++)
                        if (self->q[i].kind == 'P')
                            goto bail;
                }
                if (quiet) {
                    found = lookup_bytes(self->stmts, name, z2 - name, &st);
                    if (found < 0)
                        goto fail;
                }
                if (found == 0) {
                    if (self->gstmts == NULL)
                        goto bail;
                    found = lookup_bytes(self->gstmts, name, z2 - name, &st);
                    if (found < 0)
                        goto fail;
                    if (found == 0)
                        goto bail;
                    planned = 1;
                }
            }
            if (planned) {
                /* A prepared statement the read-only guard plans: one per chunk, with
                   nothing else in flight. */
                if (gstate > 2 || guarded || self->head != self->tail)
                    goto bail;
                if (!PyTuple_Check(st) || PyTuple_GET_SIZE(st) != 9 ||
                    !PyTuple_Check(PyTuple_GET_ITEM(st, 6)) ||
                    PyTuple_GET_SIZE(PyTuple_GET_ITEM(st, 6)) != 3 ||
                    !PyBytes_Check(PyTuple_GET_ITEM(st, 1)) ||
                    !PyBytes_Check(PyTuple_GET_ITEM(st, 8)))
                    goto bail;
                PyObject *gp = PyTuple_GET_ITEM(PyTuple_GET_ITEM(st, 6), gstate);
                if (!PyTuple_Check(gp) || PyTuple_GET_SIZE(gp) != 7 ||
                    !PyBytes_Check(PyTuple_GET_ITEM(gp, 0)) ||
                    !PyTuple_Check(PyTuple_GET_ITEM(gp, 1)) ||
                    !PyBytes_Check(PyTuple_GET_ITEM(gp, 2)) ||
                    !PyTuple_Check(PyTuple_GET_ITEM(gp, 3)) ||
                    !PyUnicode_Check(PyTuple_GET_ITEM(gp, 6)) ||
                    PyUnicode_GET_LENGTH(PyTuple_GET_ITEM(gp, 6)) != 1)
                    goto bail;
                CHECK_OR_BAIL(session_agrees(self, gstate));
                /* the session prepares the guard's statements the first time */
                CHECK_OR_BAIL(guard_prepared(self, PyTuple_GET_ITEM(gp, 1)));
                CHECK_OR_BAIL(guard_prepared(self, PyTuple_GET_ITEM(gp, 3)));
                int with = PyObject_IsTrue(PyTuple_GET_ITEM(st, 7));
                if (with < 0)
                    goto fail;
                if (with) {
                    int r = bind_params((const unsigned char *)z2 + 1,
                                        (const unsigned char *)bend,
                                        PyTuple_GET_ITEM(st, 1), PyTuple_GET_ITEM(st, 8),
                                        &pl->params, &pl->frag);
                    if (r < 0)
                        goto fail;
                    if (r == 0)
                        goto bail;
                }
                pl->gplan = gp;
                guarded = 1;
            }
            if (!PyTuple_Check(st) || PyTuple_GET_SIZE(st) < 5 ||
                !PyBytes_Check(PyTuple_GET_ITEM(st, 1)) || !PyBytes_Check(PyTuple_GET_ITEM(st, 2)))
                goto bail;
            pl->verdict = Py_NewRef(st);
            bound = st;
            bound_pl = pl;
            break;
        }
        case 'E':
            /* the unnamed portal, bound earlier in this same chunk */
            if (bound == NULL || bend - body != 5 || body[0] != 0)
                goto bail;
            pl->verdict = Py_NewRef(bound);
            if (bound_pl != NULL && bound_pl->gplan != NULL) {
                if (guarded_e >= 0)
                    goto bail; /* once: the guard's state moves with it */
                guarded_e = count;
                pl->gplan = bound_pl->gplan;
                pl->params = Py_XNewRef(bound_pl->params);
                pl->frag = Py_XNewRef(bound_pl->frag);
                /* What follows in this chunk meets the guard as this plan leaves it (a
                   write released the savepoint: a read after it is no longer quiet). */
                int blk = PyObject_IsTrue(PyTuple_GET_ITEM(pl->gplan, 4));
                int ro = PyObject_IsTrue(PyTuple_GET_ITEM(pl->gplan, 5));
                if (blk < 0 || ro < 0)
                    goto fail;
                quiet = !blk || ro;
                gstate = !blk ? 0 : ro ? 2 : 1;
            }
            break;
        case 'D':
            /* Describe of the unnamed portal (libpq sends one with each prepared query) */
            if (length != 6 || body[0] != 'P' || body[1] != 0)
                goto bail;
            break;
        case 'S':
        case 'H':
            if (length != 4)
                goto bail;
            break;
        default:
            goto bail;
        }
        count++;
        p = end;
    }
    /* A Parse changes the session's statements: only in a batch that ends in this chunk
       (the session then sees no half batch of the fast path's). The same for a guarded
       statement, which moves the guard's state: bound and executed here, then Sync. */
    if (parsed != NULL && plan[count - 1].type != 'S')
        goto bail;
    if (guarded && (guarded_e < 0 || plan[count - 1].type != 'S'))
        goto bail;
    /* Second pass: queue what the target owes, then forward the chunk unchanged. */
    double t0 = now_seconds();
    int intents = 0;
    char sync_status = 0;
    for (int i = 0; i < count; i++) {
        Planned *pl = &plan[i];
        if (pl->type == 'H')
            continue;
        if (pl->type == 'B') {
            /* keep the session's view of the unnamed portal in step */
            PyObject *body = PyBytes_FromStringAndSize(base + pl->start + 5, pl->end - pl->start - 5);
            if (body == NULL)
                goto fail;
            PyObject *value = PyTuple_Pack(2, PyTuple_GET_ITEM(pl->verdict, 4), body);
            if (value == NULL || PyDict_SetItem(self->portals, str_empty, value) < 0) {
                Py_DECREF(body);
                Py_XDECREF(value);
                goto fail;
            }
            Py_DECREF(value);
            /* ... and the statement as it was at Bind (a portal keeps its plan) */
            if (self->bound != NULL && PyTuple_GET_SIZE(pl->verdict) > 5) {
                value = PyTuple_Pack(2, body, PyTuple_GET_ITEM(pl->verdict, 5));
                if (value == NULL || PyDict_SetItem(self->bound, str_empty, value) < 0) {
                    Py_DECREF(body);
                    Py_XDECREF(value);
                    goto fail;
                }
                Py_DECREF(value);
            }
            Py_DECREF(body);
        }
        PyObject *prior = NULL;
        if (pl->type == 'P') {
            /* the session's view of the unnamed statement, as its Parse handler keeps it
               (what it held before goes with the entry: restored if the Parse fails) */
            PyObject *info = PyTuple_GET_ITEM(pl->verdict, 5);
            prior = PyDict_GetItemWithError(self->pystmts, str_empty);
            if (prior == NULL && PyErr_Occurred())
                goto fail;
            Py_XINCREF(prior);
            /* the compiled memo of the name: a read's in stmts, one the guard plans in
               gstmts (never both: a read entry is used without the guard) */
            int guarded_p = PyTuple_GET_SIZE(pl->verdict) == 9;
            PyObject *into = guarded_p ? self->gstmts : self->stmts;
            PyObject *other = guarded_p ? self->stmts : self->gstmts;
            if (PyDict_SetItem(self->pystmts, str_empty, info) < 0 ||
                PyDict_SetItem(into, bytes_empty, pl->verdict) < 0 ||
                (other != NULL && dict_discard(other, bytes_empty) < 0)) {
                Py_XDECREF(prior);
                goto fail;
            }
        }
        if (pl->type == 'E' && pl->gplan != NULL &&
            push_guard(self, PyTuple_GET_ITEM(pl->gplan, 1), t0) < 0)
            goto fail; /* the guard's statements right before the Execute */
        Entry *e = push(self);
        if (e == NULL) {
            Py_XDECREF(prior);
            goto fail;
        }
        e->kind = pl->type;
        e->t0 = t0;
        if (pl->type == 'S' && sync_status) {
            e->status = sync_status; /* the batch of a guarded Execute ends so */
            sync_status = 0;
        }
        if (pl->type == 'P') {
            e->sql = Py_NewRef(PyTuple_GET_ITEM(pl->verdict, 5));
            e->decision = prior; /* owned; handed over by drain() */
        }
        else if (pl->type == 'Q') {
            e->decision = Py_NewRef(PyTuple_GET_ITEM(pl->verdict, 0));
            e->fragment = Py_NewRef(PyTuple_GET_ITEM(pl->verdict, 1));
            e->raw = Py_NewRef(chunk);
            e->off = pl->start + 5;
            e->len = pl->end - pl->start - 6;
            if (pl->gplan != NULL) {
                e->hide = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(pl->gplan, 2));
                if (e->hide == (unsigned long)-1 && PyErr_Occurred())
                    goto fail;
                e->status = (char)PyUnicode_READ_CHAR(PyTuple_GET_ITEM(pl->gplan, 5), 0);
                e->plan = Py_NewRef(pl->gplan);
            }
        }
        else if (pl->type == 'E') {
            e->decision = Py_NewRef(PyTuple_GET_ITEM(pl->verdict, 0));
            e->fragment = Py_NewRef(pl->frag ? pl->frag : PyTuple_GET_ITEM(pl->verdict, 1));
            e->params = Py_XNewRef(pl->params);
            e->raw = Py_NewRef(PyTuple_GET_ITEM(pl->verdict, 2));
            e->sql = Py_NewRef(PyTuple_GET_ITEM(pl->verdict, 3));
        }
        if ((pl->type == 'Q' || pl->type == 'E') && self->iprefix != Py_None) {
            /* write-ahead: the intent is recorded before the statement is sent */
            e->n = self->next_n;
            self->next_n += 2;
            if (audit_line(self, e, t0, 1) < 0)
                goto fail;
            intents++;
        }
        if (pl->type == 'E' && pl->gplan != NULL) {
            /* the guard's statements right after the Execute (e is not used again) */
            sync_status = (char)PyUnicode_READ_CHAR(PyTuple_GET_ITEM(pl->gplan, 6), 0);
            if (push_guard(self, PyTuple_GET_ITEM(pl->gplan, 3), t0) < 0)
                goto fail;
        }
    }
    PyObject *send = chunk;
    if (guarded_e >= 0) {
        /* The guard's statements around the Execute, and its state after them (the
           session's txs, as _guard_before_execute and _guard_after_execute leave it). */
        PyObject *gp = plan[guarded_e].gplan;
        if (set_guard_state(self, PyTuple_GET_ITEM(gp, 4), PyTuple_GET_ITEM(gp, 5)) < 0)
            goto fail;
        PyObject *pre = PyTuple_GET_ITEM(gp, 0), *post = PyTuple_GET_ITEM(gp, 2);
        Py_ssize_t blen = PyBytes_GET_SIZE(pre), alen = PyBytes_GET_SIZE(post);
        Py_ssize_t at = plan[guarded_e].start, to = plan[guarded_e].end;
        if (blen || alen) {
            built = PyBytes_FromStringAndSize(NULL, n + blen + alen);
            if (built == NULL)
                goto fail;
            char *o = PyBytes_AS_STRING(built);
            memcpy(o, base, at);
            memcpy(o + at, PyBytes_AS_STRING(pre), blen);
            memcpy(o + at + blen, base + at, to - at);
            memcpy(o + blen + to, PyBytes_AS_STRING(post), alen);
            memcpy(o + blen + to + alen, base + to, n - to);
            send = built;
        }
    }
    else if (count == 1 && plan[0].gplan != NULL) {
        /* The guard's plan: its state after this statement (the session's txs, as
           _forward_query sets it), and the Query with the guard's statements around the
           client's text as guard.rewrite joins them (the text stripped as the session's
           memo path strips it), or unchanged when the plan adds nothing. */
        PyObject *gp = plan[0].gplan;
        if (set_guard_state(self, PyTuple_GET_ITEM(gp, 3), PyTuple_GET_ITEM(gp, 4)) < 0)
            goto fail;
        PyObject *prefix = PyTuple_GET_ITEM(gp, 0), *suffix = PyTuple_GET_ITEM(gp, 1);
        Py_ssize_t plen = PyBytes_GET_SIZE(prefix), slen = PyBytes_GET_SIZE(suffix);
        if (plen || slen) {
            const unsigned char *text = u + 5;
            Py_ssize_t a = 0, z = n - 6;
            while (a < z && py_space(text[a]))
                a++;
            while (z > a && py_space(text[z - 1]))
                z--;
            if (z > a && text[z - 1] == ';') {
                z--;
                while (z > a && py_space(text[z - 1]))
                    z--;
            }
            Py_ssize_t body = plen + (z - a) + slen + 1; /* the text is at most max_len */
            built = PyBytes_FromStringAndSize(NULL, 5 + body);
            if (built == NULL)
                goto fail;
            char *o = PyBytes_AS_STRING(built);
            o[0] = 'Q';
            uint32_t len = (uint32_t)(body + 4);
            o[1] = (char)(len >> 24);
            o[2] = (char)(len >> 16);
            o[3] = (char)(len >> 8);
            o[4] = (char)len;
            memcpy(o + 5, PyBytes_AS_STRING(prefix), plen);
            memcpy(o + 5 + plen, text + a, z - a);
            memcpy(o + 5 + plen + (z - a), PyBytes_AS_STRING(suffix), slen);
            o[5 + body - 1] = 0;
            send = built;
        }
    }
    if (Py_IS_TYPE(self->flush, &WriteAheadType)) {
        WriteAhead *wa = (WriteAhead *)self->flush;
        if (intents || wa->head < wa->tail) {
            /* sent at the end of this loop turn, after one spool write for every
               session's chunks of the turn (and after whatever was deferred before) */
            self->armed = 1;
            if (write_ahead_defer(wa, self->session, self->upstream_write, send) < 0)
                goto fail;
            result = Py_NewRef(Py_True);
            goto done;
        }
    }
    else if (intents && self->flush != Py_None) {
        PyObject *fr = PyObject_CallNoArgs(self->flush);
        if (fr == NULL)
            goto fail;
        Py_DECREF(fr);
    }
    /* armed before the write: a pause_writing() the write causes disarms for good */
    self->armed = 1;
    PyObject *r = PyObject_CallOneArg(self->upstream_write, send);
    if (r == NULL)
        goto fail;
    Py_DECREF(r);
    result = Py_NewRef(Py_True);
    goto done;
bail:
    result = Py_NewRef(Py_False);
fail:
    self->armed = 0;
done:
    for (int i = 0; i < MAX_BATCH; i++) {
        Py_XDECREF(plan[i].verdict);
        Py_XDECREF(plan[i].params);
        Py_XDECREF(plan[i].frag);
    }
    Py_XDECREF(built);
    return result;
}

/* ---- target -> client */

static const char *const ROW_VERBS[] = {"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE",
                                        "COPY", "FETCH", "MOVE", NULL};

/* The rows a CommandComplete tag reports (the twin of session._rows), or -1. */
static long long
tag_rows(const char *tag, Py_ssize_t n)
{
    Py_ssize_t sp = -1;
    for (Py_ssize_t i = n - 1; i >= 0; i--)
        if (tag[i] == ' ') {
            sp = i;
            break;
        }
    if (sp < 0 || sp == n - 1)
        return -1;
    long long v = 0;
    for (Py_ssize_t i = sp + 1; i < n; i++) {
        if (!is_digit((unsigned char)tag[i]) || v > 1000000000000000LL)
            return -1;
        v = v * 10 + (tag[i] - '0');
    }
    Py_ssize_t w = 0;
    while (w < n && tag[w] != ' ')
        w++;
    for (int k = 0; ROW_VERBS[k] != NULL; k++)
        if ((Py_ssize_t)strlen(ROW_VERBS[k]) == w && memcmp(tag, ROW_VERBS[k], w) == 0)
            return v;
    return -1;
}

static int
json_ascii(Buf *b, const char *s, Py_ssize_t n)
{
    static const char hex[] = "0123456789abcdef";
    if (buf_reserve(b, 2 + 6 * n) < 0)
        return -1;
    char *o = b->data + b->len;
    *o++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            *o++ = '\\';
            *o++ = (char)c;
        }
        else if (c < 0x20) {
            *o++ = '\\';
            switch (c) {
            case '\n': *o++ = 'n'; break;
            case '\r': *o++ = 'r'; break;
            case '\t': *o++ = 't'; break;
            case '\b': *o++ = 'b'; break;
            case '\f': *o++ = 'f'; break;
            default:
                *o++ = 'u'; *o++ = '0'; *o++ = '0';
                *o++ = hex[c >> 4]; *o++ = hex[c & 15];
            }
        }
        else {
            *o++ = (char)c;
        }
    }
    *o++ = '"';
    b->len = o - b->data;
    return 0;
}

/* Decimal digits of v >= 0 at p; returns the count. */
static int
put_uint(char *p, unsigned long long v)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (int i = 0; i < n; i++)
        p[i] = tmp[n - 1 - i];
    return n;
}

/* v (>= 0) with exactly `places` decimals (printf's %.Nf is slow: glibc's
   printf_fp showed up in profiles of the relay). */
static int
put_fixed(char *p, double v, int places)
{
    unsigned long long scale = places == 6 ? 1000000ULL : 1000ULL;
    if (!(v >= 0))
        v = 0;
    unsigned long long units = (unsigned long long)(v * (double)scale + 0.5);
    int n = put_uint(p, units / scale);
    p[n++] = '.';
    unsigned long long frac = units % scale;
    for (int i = places - 1; i >= 0; i--) {
        p[n + i] = (char)('0' + frac % 10);
        frac /= 10;
    }
    return n + places;
}

/* `key` piece i of the layout at p; returns its length. */
static inline Py_ssize_t
put_key(char *p, FastPath *self, int i)
{
    memcpy(p, self->key[i], self->key_len[i]);
    return self->key_len[i];
}

/* One audit line, with the fields of ClientSession._audit: the session's prefix, the
   time, the statement's text, the decision fragment, then the outcome, duration and row
   count (keys from the layout); intent: the record written before the statement is sent
   (ClientSession._intent), with its number. */
static int
audit_line(FastPath *self, Entry *e, double now, int intent)
{
    Buf tmp = {NULL, 0, 0};
    AuditBuffer *direct = Py_IS_TYPE(self->audit_write, &AuditBufferType)
                          ? (AuditBuffer *)self->audit_write : NULL;
    Buf *bp = direct ? &direct->buf : &tmp;
    Py_ssize_t start = bp->len;
#define b (*bp)
    /* the longest run of pieces: 3 keys of KEY_MAX + 3 numbers of at most 24 + 2 bytes */
    char num[3 * KEY_MAX + 3 * 24 + 2];
    int rc = -1;
    PyObject *prefix = intent ? self->iprefix : self->prefix;
    if (buf_add(&b, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix)) < 0)
        goto done;
    Py_ssize_t k = put_key(num, self, KEY_AT);
    k += put_fixed(num + k, now, 6);
    k += put_key(num + k, self, KEY_TEXT);
    if (buf_add(&b, num, k) < 0)
        goto done;
    if (e->kind == 'Q') {
        if (json_ascii(&b, PyBytes_AS_STRING(e->raw) + e->off, e->len) < 0)
            goto done;
    }
    else if (buf_add(&b, PyBytes_AS_STRING(e->raw), PyBytes_GET_SIZE(e->raw)) < 0)
        goto done;
    if (buf_add(&b, ",", 1) < 0 ||
        buf_add(&b, PyBytes_AS_STRING(e->fragment), PyBytes_GET_SIZE(e->fragment)) < 0)
        goto done;
    if (intent) {
        k = put_key(num, self, KEY_N);
        k += put_uint(num + k, (unsigned long long)e->n);
        num[k++] = '}';
        num[k++] = '\n';
        if (buf_add(&b, num, k) < 0)
            goto done;
        goto written;
    }
    k = put_key(num, self, KEY_DONE);
    k += put_fixed(num + k, (now - e->t0) * 1000, 3);
    k += put_key(num + k, self, KEY_COUNT);
    if (e->rows >= 0)
        k += put_uint(num + k, (unsigned long long)e->rows);
    else {
        memcpy(num + k, "null", 4);
        k += 4;
    }
    if (e->n > 0) {
        k += put_key(num + k, self, KEY_N);
        k += put_uint(num + k, (unsigned long long)e->n);
    }
    num[k++] = '}';
    num[k++] = '\n';
    if (buf_add(&b, num, k) < 0)
        goto done;
written:
#undef b
    if (direct) {
        rc = audit_buffer_added(direct);
        return rc;
    }
    PyObject *line = PyBytes_FromStringAndSize(tmp.data, tmp.len);
    if (line == NULL)
        goto done;
    PyObject *r = PyObject_CallOneArg(self->audit_write, line);
    Py_DECREF(line);
    if (r == NULL)
        goto done;
    Py_DECREF(r);
    rc = 0;
done:
    if (direct)
        direct->buf.len = start; /* no half line */
    PyMem_Free(tmp.data);
    return rc;
}

PyDoc_STRVAR(server_doc,
"server(chunk) -> bool\n\n"
"Relay a chunk from the target if it holds only ordinary answers to what the\n"
"fast path queued; False (nothing done) otherwise.");

static PyObject *
FastPath_server(FastPath *self, PyObject *chunk)
{
    if (!PyBytes_Check(chunk)) {
        PyErr_SetString(PyExc_TypeError, "chunk must be bytes");
        return NULL;
    }
    if (self->head == self->tail)
        Py_RETURN_FALSE;
    const char *base = PyBytes_AS_STRING(chunk);
    const unsigned char *u = (const unsigned char *)base;
    Py_ssize_t n = PyBytes_GET_SIZE(chunk);
    /* First pass: every message must be whole and answer the queue as expected. */
    Py_ssize_t idx = self->head, p = 0, q_tagged = -1;
    int status = -1; /* the transaction status the session expects (its tx_status) */
    /* the guard's own CommandCompletes in this chunk (not forwarded): where they are */
    Py_ssize_t hidden[MAX_HIDDEN][2];
    int nhidden = 0;
    Py_ssize_t ci_idx = -1;
    int ci_local = 0;
    Py_ssize_t g_idx = -1; /* the guard statement (entry G) answered, and its answers */
    int g_step = 0;
    while (p < n) {
        if (n - p < 5)
            Py_RETURN_FALSE;
        uint32_t length = get_u32(u + p + 1);
        if (length < 4 || (Py_ssize_t)length > n - p - 1)
            Py_RETURN_FALSE;
        if (idx == self->tail)
            Py_RETURN_FALSE;
        char kind = self->q[idx].kind;
        if (kind == 'G') {
            /* one of the guard's statements: BindComplete, CommandComplete, CloseComplete,
               none of them forwarded */
            if (g_idx != idx) {
                g_idx = idx;
                g_step = self->q[idx].ci;
            }
            char want = g_step == 0 ? '2' : g_step == 1 ? 'C' : '3';
            if (base[p] != want || nhidden == MAX_HIDDEN)
                Py_RETURN_FALSE;
            if (want == 'C') {
                const char *tag = base + p + 5;
                Py_ssize_t tlen = (Py_ssize_t)length - 5;
                if (length < 5 || tag[tlen] != 0)
                    Py_RETURN_FALSE;
            }
            else if (length != 4)
                Py_RETURN_FALSE;
            hidden[nhidden][0] = p;
            hidden[nhidden][1] = p + 1 + length;
            nhidden++;
            if (++g_step == 3)
                idx++;
            p += 1 + length;
            continue;
        }
        switch (base[p]) {
        case 'T':
            if (kind == 'D')
                idx++; /* answers a Describe */
            else if (kind != 'Q' && kind != 'E')
                Py_RETURN_FALSE;
            break;
        case 'n':
            if (kind != 'D')
                Py_RETURN_FALSE;
            idx++;
            break;
        case 'D':
            if (kind != 'Q' && kind != 'E')
                Py_RETURN_FALSE;
            break;
        case 'C': {
            /* a tag exactly as decode_command_complete reads it (ASCII: it decodes
               the tag as UTF-8 and ends the session on bytes that are not), with a row
               count small enough to be the same number in C; one tag per Query
               (several go to the Python session, which keeps them all) */
            const char *tag = base + p + 5;
            Py_ssize_t tlen = (Py_ssize_t)length - 5;
            if (length < 5 || tag[tlen] != 0 || memchr(tag, 0, tlen) != NULL ||
                !is_ascii((const unsigned char *)tag, tlen))
                Py_RETURN_FALSE;
            Py_ssize_t digits = 0;
            while (digits < tlen && is_digit((unsigned char)tag[tlen - 1 - digits]))
                digits++;
            if (digits > 15)
                Py_RETURN_FALSE;
            if (kind == 'E') {
                idx++;
                break;
            }
            if (kind != 'Q')
                Py_RETURN_FALSE;
            Entry *qe = &self->q[idx];
            if (qe->plan != NULL) {
                if (ci_idx != idx) {
                    ci_idx = idx;
                    ci_local = 0;
                }
                int i = qe->ci + ci_local++;
                if (i < HIDE_BITS && (qe->hide >> i) & 1) {
                    if (nhidden == MAX_HIDDEN)
                        Py_RETURN_FALSE;
                    hidden[nhidden][0] = p;
                    hidden[nhidden][1] = p + 1 + length;
                    nhidden++;
                    break;
                }
            }
            if (qe->tag != NULL || q_tagged == idx)
                Py_RETURN_FALSE;
            q_tagged = idx;
            break;
        }
        case '1':
            if (kind != 'P' || length != 4)
                Py_RETURN_FALSE;
            idx++;
            break;
        case '2':
            if (kind != 'B' || length != 4)
                Py_RETURN_FALSE;
            idx++;
            break;
        case 'Z':
            if (kind != 'Q' && kind != 'S')
                Py_RETURN_FALSE;
            if (length != 5)
                Py_RETURN_FALSE;
            if (self->q[idx].status) {
                /* after a statement the guard planned: the status its plan leads to */
                if ((unsigned char)base[p + 5] != (unsigned char)self->q[idx].status)
                    Py_RETURN_FALSE;
                status = (unsigned char)self->q[idx].status; /* what the session will know */
                idx++;
                break;
            }
            if (status < 0) {
                /* a change of transaction status is the session's (its read-only guard
                   plans from it): only the status it already knows passes here */
                PyObject *cur = PyObject_GetAttr(self->session, str_tx_status);
                if (cur == NULL)
                    return NULL;
                status = PyUnicode_Check(cur) && PyUnicode_GET_LENGTH(cur) == 1
                         ? (int)PyUnicode_READ_CHAR(cur, 0) : 0;
                Py_DECREF(cur);
            }
            if ((unsigned char)base[p + 5] != status)
                Py_RETURN_FALSE;
            idx++;
            break;
        default:
            Py_RETURN_FALSE;
        }
        p += 1 + length;
    }
    /* Second pass: forward (without the guard's own answers), then account for each. */
    if (nhidden) {
        Py_ssize_t total = n;
        for (int i = 0; i < nhidden; i++)
            total -= hidden[i][1] - hidden[i][0];
        if (total > 0) {
            PyObject *shown = PyBytes_FromStringAndSize(NULL, total);
            if (shown == NULL)
                return NULL;
            char *o = PyBytes_AS_STRING(shown);
            Py_ssize_t from = 0;
            for (int i = 0; i < nhidden; i++) {
                memcpy(o, base + from, hidden[i][0] - from);
                o += hidden[i][0] - from;
                from = hidden[i][1];
            }
            memcpy(o, base + from, n - from);
            PyObject *r = PyObject_CallOneArg(self->client_write, shown);
            Py_DECREF(shown);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
        }
    }
    else {
        PyObject *r = PyObject_CallOneArg(self->client_write, chunk);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
    }
    double now = 0;
    p = 0;
    while (p < n) {
        Py_ssize_t end = p + 1 + get_u32(u + p + 1);
        Entry *e = &self->q[self->head];
        if (e->kind == 'G') {
            if (++e->ci == 3) {
                entry_clear(e);
                self->head++;
            }
            p = end;
            continue;
        }
        switch (base[p]) {
        case 'C': {
            if (e->plan != NULL && e->kind == 'Q') {
                int i = e->ci++;
                if (i < HIDE_BITS && (e->hide >> i) & 1)
                    break; /* the guard's own statement */
            }
            Py_ssize_t tlen = end - p - 6; /* without the terminating NUL */
            const char *tag = base + p + 5;
            const char *z = memchr(tag, 0, end - p - 5);
            if (z != NULL)
                tlen = z - tag;
            long long rows = tag_rows(tag, tlen);
            if (rows >= 0)
                e->rows = (e->rows < 0 ? 0 : e->rows) + rows;
            Py_XSETREF(e->tag, PyBytes_FromStringAndSize(tag, tlen));
            if (e->tag == NULL)
                return NULL;
            if (e->kind == 'E') {
                if (now == 0)
                    now = now_seconds();
                int rc = audit_line(self, e, now, 0);
                entry_clear(e);
                self->head++;
                if (rc < 0)
                    return NULL;
            }
            break;
        }
        case 'T':
        case 'n':
            if (e->kind == 'D') {
                entry_clear(e);
                self->head++;
            }
            break;
        case '1':
        case '2':
            entry_clear(e);
            self->head++;
            break;
        case 'Z': {
            unsigned char status = (unsigned char)base[p + 5];
            PyObject *st = status == 'I' ? Py_NewRef(str_I) : status == 'T' ? Py_NewRef(str_T)
                           : status == 'E' ? Py_NewRef(str_E) : PyUnicode_FromOrdinal(status);
            if (st == NULL)
                return NULL;
            int set = PyObject_SetAttr(self->session, str_tx_status, st);
            Py_DECREF(st);
            if (set < 0)
                return NULL;
            int rc = 0;
            if (e->kind == 'Q') {
                if (now == 0)
                    now = now_seconds();
                rc = audit_line(self, e, now, 0);
            }
            entry_clear(e);
            self->head++;
            if (rc < 0)
                return NULL;
            break;
        }
        default:
            break;
        }
        p = end;
    }
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(drain_doc,
"drain() -> list\n\n"
"Hand the queued entries over: (kind, sql, decision, t0, rows, tag, n, guard) each, oldest\n"
"first; kind is b'Q', b'P', b'B', b'E', b'S' or b'D'; rows and tag None when not seen\n"
"yet; for b'P' sql is the statement's StmtInfo (see the parses dict) and decision\n"
"what the unnamed statement held before it (None: nothing); guard is None, or for a\n"
"Query planned by the read-only guard (its plan, CommandCompletes seen so far).");

static PyObject *
FastPath_drain(FastPath *self, PyObject *unused)
{
    self->armed = 0;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = self->head; i < self->tail; i++) {
        Entry *e = &self->q[i];
        PyObject *sql;
        if (e->kind == 'Q')
            sql = PyUnicode_DecodeASCII(PyBytes_AS_STRING(e->raw) + e->off, e->len, "strict");
        else
            sql = Py_NewRef(e->sql ? e->sql : Py_None);
        if (sql == NULL)
            goto fail;
        PyObject *guard = e->plan ? Py_BuildValue("(Oi)", e->plan, e->ci)
                                  : Py_NewRef(e->params ? e->params : Py_None);
        if (guard == NULL) {
            Py_DECREF(sql);
            goto fail;
        }
        PyObject *item = Py_BuildValue("(y#NOdOOLN)", &e->kind, (Py_ssize_t)1, sql,
                                       e->decision ? e->decision : Py_None, e->t0,
                                       Py_None, e->tag ? e->tag : Py_None,
                                       e->kind == 'G' ? (long long)e->ci : e->n, guard);
        if (item == NULL)
            goto fail;
        if (e->rows >= 0) {
            PyObject *rows = PyLong_FromLongLong(e->rows);
            if (rows == NULL) {
                Py_DECREF(item);
                goto fail;
            }
            PyObject *old = PyTuple_GET_ITEM(item, 4);
            PyTuple_SET_ITEM(item, 4, rows);
            Py_DECREF(old);
        }
        if (PyList_Append(out, item) < 0) {
            Py_DECREF(item);
            goto fail;
        }
        Py_DECREF(item);
    }
    for (Py_ssize_t i = self->head; i < self->tail; i++)
        entry_clear(&self->q[i]);
    self->head = self->tail = 0;
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

static PyObject *
FastPath_get_pending(FastPath *self, void *closure)
{
    return PyLong_FromSsize_t(self->tail - self->head);
}

static PyObject *
FastPath_disarm(FastPath *self, PyObject *unused)
{
    self->armed = 0;
    Py_RETURN_NONE;
}

static PyObject *
FastPath_get_armed(FastPath *self, void *closure)
{
    return PyBool_FromLong(self->armed);
}

static PyMethodDef FastPath_methods[] = {
    {"disarm", (PyCFunction)FastPath_disarm, METH_NOARGS,
     "disarm(): the next chunk on either side goes to the Python session first"},
    {"client", (PyCFunction)FastPath_client, METH_O, client_doc},
    {"server", (PyCFunction)FastPath_server, METH_O, server_doc},
    {"drain", (PyCFunction)FastPath_drain, METH_NOARGS, drain_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef FastPath_getset[] = {
    {"pending", (getter)FastPath_get_pending, NULL, "entries queued", NULL},
    {"armed", (getter)FastPath_get_armed, NULL,
     "the relays may call the fast path without asking the session", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxies.postgres._speedups.FastPath",
    .tp_basicsize = sizeof(FastPath),
    .tp_dealloc = (destructor)FastPath_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "FastPath(...): the relay's common case, one call per chunk (see session.py).",
    .tp_traverse = (traverseproc)FastPath_traverse,
    .tp_clear = (inquiry)FastPath_clear,
    .tp_methods = FastPath_methods,
    .tp_getset = FastPath_getset,
    .tp_new = FastPath_new,
};

/* ================================================================ Relay
 *
 * The protocol object uvloop calls for one side of a ready session, so that a
 * chunk the fast path takes never enters the Python interpreter (uvloop caches
 * protocol.data_received, a C method here). Relay(fast, owner, side):
 * side 'c' serves the client transport for the ClientSession `owner`, side 's'
 * the target transport for the Upstream `owner`.
 *
 * While the fast path is armed (the last client chunk went the fast way, which
 * the session allows only when it has nothing of its own in flight), a chunk
 * goes straight to FastPath.client / FastPath.server. Any other chunk, and every
 * chunk after one the fast path did not take, disarms it and goes to
 * owner.data_received, exactly as without a Relay (a declined chunk with a second
 * argument False: the owner does not offer it to the fast path again); the session
 * re-arms it by
 * calling FastPath.client itself once its own queue is empty again. Everything
 * else a protocol receives (connection_lost, eof_received, pause_writing,
 * resume_writing) disarms and is passed on to the owner.
 */

typedef struct {
    PyObject_HEAD
    FastPath *fast;
    PyObject *owner;
    PyObject *slow;   /* owner.data_received */
    char side;
} Relay;


static int
Relay_traverse(Relay *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fast);
    Py_VISIT(self->owner);
    Py_VISIT(self->slow);
    return 0;
}

static int
Relay_clear(Relay *self)
{
    Py_CLEAR(self->fast);
    Py_CLEAR(self->owner);
    Py_CLEAR(self->slow);
    return 0;
}

static void
Relay_dealloc(Relay *self)
{
    PyObject_GC_UnTrack(self);
    Relay_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fast", "owner", "side", NULL};
    PyObject *fast, *owner;
    const char *side;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!Os:Relay", kwlist, &FastPathType, &fast,
                                     &owner, &side))
        return NULL;
    if (strcmp(side, "client") != 0 && strcmp(side, "server") != 0) {
        PyErr_SetString(PyExc_ValueError, "side must be 'client' or 'server'");
        return NULL;
    }
    PyObject *slow = PyObject_GetAttr(owner, str_data_received);
    if (slow == NULL)
        return NULL;
    Relay *self = (Relay *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(slow);
        return NULL;
    }
    self->fast = (FastPath *)Py_NewRef(fast);
    self->owner = Py_NewRef(owner);
    self->slow = slow;
    self->side = side[0];
    return (PyObject *)self;
}

static PyObject *
Relay_data_received(Relay *self, PyObject *data)
{
    FastPath *fast = self->fast;
    if (fast == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "relay already cleared");
        return NULL;
    }
    if (fast->armed && PyBytes_CheckExact(data)) {
        PyObject *r;
        if (self->side == 'c')
            r = FastPath_client(fast, data);
        else if (fast->head != fast->tail)
            r = FastPath_server(fast, data);
        else
            r = Py_NewRef(Py_False); /* nothing the fast path waits for */
        if (r == Py_True) {
            Py_DECREF(r);
            Py_RETURN_NONE;
        }
        if (r == NULL) {
            fast->armed = 0;
            if (!PyErr_ExceptionMatches(PyExc_Exception))
                return NULL; /* KeyboardInterrupt, SystemExit: not this session's */
            /* as the owner's data_received does for an unexpected error: it logs and
               ends this session, the gateway goes on */
            PyObject *exc = take_exception();
            PyObject *h = PyObject_CallMethodOneArg(self->owner, str_fast_failed, exc);
            Py_DECREF(exc);
            if (h == NULL)
                return NULL;
            Py_DECREF(h);
            Py_RETURN_NONE;
        }
        Py_DECREF(r);
        /* declined: the owner need not offer the same chunk to the fast path again */
        fast->armed = 0;
        return PyObject_CallFunctionObjArgs(self->slow, data, Py_False, NULL);
    }
    fast->armed = 0;
    return PyObject_CallOneArg(self->slow, data);
}

static PyObject *
relay_forward(Relay *self, const char *name, PyObject *const *args, Py_ssize_t nargs)
{
    if (self->fast == NULL || self->owner == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "relay already cleared");
        return NULL;
    }
    self->fast->armed = 0;
    PyObject *m = PyObject_GetAttrString(self->owner, name);
    if (m == NULL)
        return NULL;
    PyObject *r = PyObject_Vectorcall(m, args, nargs, NULL);
    Py_DECREF(m);
    return r;
}

static PyObject *
Relay_connection_lost(Relay *self, PyObject *exc)
{
    return relay_forward(self, "connection_lost", &exc, 1);
}

static PyObject *
Relay_eof_received(Relay *self, PyObject *unused)
{
    return relay_forward(self, "eof_received", NULL, 0);
}

static PyObject *
Relay_pause_writing(Relay *self, PyObject *unused)
{
    return relay_forward(self, "pause_writing", NULL, 0);
}

static PyObject *
Relay_resume_writing(Relay *self, PyObject *unused)
{
    return relay_forward(self, "resume_writing", NULL, 0);
}

static PyObject *
Relay_get_owner(Relay *self, void *closure)
{
    return Py_NewRef(self->owner);
}

static PyMethodDef Relay_methods[] = {
    {"data_received", (PyCFunction)Relay_data_received, METH_O, NULL},
    {"connection_lost", (PyCFunction)Relay_connection_lost, METH_O, NULL},
    {"eof_received", (PyCFunction)Relay_eof_received, METH_NOARGS, NULL},
    {"pause_writing", (PyCFunction)Relay_pause_writing, METH_NOARGS, NULL},
    {"resume_writing", (PyCFunction)Relay_resume_writing, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Relay_getset[] = {
    {"owner", (getter)Relay_get_owner, NULL, "the Python protocol behind this relay", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxies.postgres._speedups.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Relay(fast, owner, side): the protocol of one side of a ready session.",
    .tp_traverse = (traverseproc)Relay_traverse,
    .tp_clear = (inquiry)Relay_clear,
    .tp_methods = Relay_methods,
    .tp_getset = Relay_getset,
    .tp_new = Relay_new,
};

static PyMethodDef module_methods[] = {
    {"fast_shape", (PyCFunction)(void (*)(void))py_fast_shape, METH_FASTCALL, fast_shape_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "proxies.postgres._speedups",
    .m_doc = "Compiled hot loops of the PostgreSQL gateway (see rowmask.py for the reference).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&RowMaskerType) < 0 || PyType_Ready(&FastPathType) < 0 ||
        PyType_Ready(&AuditBufferType) < 0 || PyType_Ready(&RelayType) < 0 ||
        PyType_Ready(&WriteAheadType) < 0)
        return NULL;
    str_data_received = PyUnicode_InternFromString("data_received");
    str_fast_failed = PyUnicode_InternFromString("fast_failed");
    if (!str_data_received || !str_fast_failed)
        return NULL;
    str_tx_status = PyUnicode_InternFromString("tx_status");
    str_I = PyUnicode_InternFromString("I");
    str_T = PyUnicode_InternFromString("T");
    str_E = PyUnicode_InternFromString("E");
    str_empty = PyUnicode_InternFromString("");
    bytes_empty = PyBytes_FromStringAndSize(NULL, 0);
    if (!str_tx_status || !str_I || !str_T || !str_E || !str_empty || !bytes_empty)
        return NULL;
    str_txs = PyUnicode_InternFromString("txs");
    str_block = PyUnicode_InternFromString("block");
    str_block_ro = PyUnicode_InternFromString("block_ro");
    str_ro_open = PyUnicode_InternFromString("ro_open");
    str_hold = PyUnicode_InternFromString("hold");
    str_changed_catalog = PyUnicode_InternFromString("changed_catalog");
    str_changes_anything = PyUnicode_InternFromString("changes_anything");
    str_guard_stmts = PyUnicode_InternFromString("guard_stmts");
    if (!str_txs || !str_block || !str_block_ro || !str_ro_open || !str_hold ||
        !str_changed_catalog || !str_changes_anything || !str_guard_stmts)
        return NULL;
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RowMaskerType);
    if (PyModule_AddObject(m, "RowMasker", (PyObject *)&RowMaskerType) < 0) {
        Py_DECREF(&RowMaskerType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "AUDIT_LAYOUT_KEYS", KEYS) < 0 ||
        PyModule_AddObjectRef(m, "FastPath", (PyObject *)&FastPathType) < 0 ||
        PyModule_AddObjectRef(m, "AuditBuffer", (PyObject *)&AuditBufferType) < 0 ||
        PyModule_AddObjectRef(m, "Relay", (PyObject *)&RelayType) < 0 ||
        PyModule_AddObjectRef(m, "WriteAhead", (PyObject *)&WriteAheadType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
