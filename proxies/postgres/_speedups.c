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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

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

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "proxies.postgres._speedups",
    .m_doc = "Compiled hot loops of the PostgreSQL gateway (see rowmask.py for the reference).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&RowMaskerType) < 0)
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
    return m;
}
