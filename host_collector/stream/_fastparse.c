/*
 * _fastparse: the inner loop of StreamParser._ram_records (parser.py) in C.
 *
 * A precopy ram section is almost only CONTINUE PAGE records (8-byte header,
 * 4096 data bytes) and CONTINUE ZERO records (8-byte header, fill byte) of
 * the block the last named record chose. Interpreting them one by one in
 * Python costs about half as much CPU as relaying their bytes, so this module
 * consumes runs of exactly those two records, with the same checks as the
 * Python loop, and stops at the first byte of anything else: a record naming
 * a block, EOS, any other flag combination, an offset beyond the block, a
 * non-zero fill byte, or a record cut by `end`. parser.py then handles that
 * record itself, so every rule and every error message stays in one place.
 *
 * The buffer is only read, never past `end`; `end` is checked against the
 * buffer's length first. Built as an optional extension: without it
 * parser.py runs its own loop, with identical results.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>

/* Wire constants, as in wire.py (QEMU migration/ram.c RAM_SAVE_FLAG_*). */
#define PAGE_SIZE 4096
#define FLAGS_MASK ((uint64_t)PAGE_SIZE - 1)
#define FLAG_ZERO 0x02
#define FLAG_PAGE 0x08
#define FLAG_CONTINUE 0x20
#define PAGE_CONT (FLAG_PAGE | FLAG_CONTINUE)
#define ZERO_CONT (FLAG_ZERO | FLAG_CONTINUE)
#define HEADER 8 /* the big-endian word: offset in the block | flags */
#define PAGE_RECORD (HEADER + PAGE_SIZE)
#define ZERO_RECORD (HEADER + 1)

static uint64_t
be64(const unsigned char *p)
{
    /* gcc -O2 turns this into one load and a bswap */
    return (uint64_t)p[0] << 56 | (uint64_t)p[1] << 48 | (uint64_t)p[2] << 40 | (uint64_t)p[3] << 32 |
           (uint64_t)p[4] << 24 | (uint64_t)p[5] << 16 | (uint64_t)p[6] << 8 | (uint64_t)p[7];
}

/* Append (start, stop, block, page) to `pages`, as the Python loop does. */
static int
append_page(PyObject *pages, Py_ssize_t start, Py_ssize_t stop, PyObject *block, uint64_t page)
{
    PyObject *rec = PyTuple_New(4);
    if (rec == NULL)
        return -1;
    PyObject *a = PyLong_FromSsize_t(start);
    PyObject *b = PyLong_FromSsize_t(stop);
    PyObject *pg = PyLong_FromUnsignedLongLong(page);
    /* The tuple owns whatever was created; its dealloc skips NULL slots. */
    PyTuple_SET_ITEM(rec, 0, a);
    PyTuple_SET_ITEM(rec, 1, b);
    Py_INCREF(block);
    PyTuple_SET_ITEM(rec, 2, block);
    PyTuple_SET_ITEM(rec, 3, pg);
    int r = (a == NULL || b == NULL || pg == NULL) ? -1 : PyList_Append(pages, rec);
    Py_DECREF(rec);
    return r;
}

PyDoc_STRVAR(continue_records_doc,
"continue_records(buf, pos, end, block, block_len, pages) -> (pos, zero_records)\n"
"\n"
"Consume complete CONTINUE PAGE and CONTINUE ZERO records of `block` (used\n"
"length `block_len` bytes) from buf[pos:end]; append (start, stop, block,\n"
"page) to the list `pages` for each PAGE record. Returns the position of the\n"
"first record not consumed and how many ZERO records were consumed.");

static PyObject *
continue_records(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t pos, end;
    PyObject *block, *len_obj, *pages;
    (void)module;

    /* "y*" takes any contiguous buffer (the proxy's bytearray) and holds an
     * export on it until PyBuffer_Release; on a later argument error
     * PyArg_ParseTuple releases it itself. */
    if (!PyArg_ParseTuple(args, "y*nnUO!O!:continue_records", &view, &pos, &end, &block,
                          &PyLong_Type, &len_obj, &PyList_Type, &pages))
        return NULL;

    uint64_t block_len = PyLong_AsUnsignedLongLong(len_obj); /* OverflowError if < 0 or >= 2**64 */
    if (block_len == (uint64_t)-1 && PyErr_Occurred())
        goto fail;
    if (pos < 0 || pos > end || end > view.len) {
        PyErr_Format(PyExc_ValueError, "positions %zd..%zd outside a buffer of %zd bytes", pos, end, view.len);
        goto fail;
    }

    const unsigned char *buf = view.buf;
    Py_ssize_t zeros = 0;
    /* Invariant: pos <= end <= view.len, so end - pos bytes from buf + pos are readable. */
    while (end - pos >= HEADER) {
        uint64_t w = be64(buf + pos);
        uint64_t flags = w & FLAGS_MASK;
        uint64_t addr = w - flags;
        if (flags == PAGE_CONT) {
            if (end - pos < PAGE_RECORD || addr >= block_len)
                break; /* cut by end, or beyond the block: parser.py decides */
            if (append_page(pages, pos, pos + PAGE_RECORD, block, w >> 12) < 0)
                goto fail;
            pos += PAGE_RECORD;
        } else if (flags == ZERO_CONT) {
            if (end - pos < ZERO_RECORD || addr >= block_len || buf[pos + HEADER] != 0)
                break;
            zeros++;
            pos += ZERO_RECORD;
        } else {
            break; /* names a block, EOS, or anything else */
        }
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("nn", pos, zeros);

fail:
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef methods[] = {
    {"continue_records", continue_records, METH_VARARGS, continue_records_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "host_collector.stream._fastparse",
    .m_doc = "The hot loop of the migration stream parser (see parser.py).",
    .m_size = 0,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__fastparse(void)
{
    return PyModuleDef_Init(&module_def);
}
