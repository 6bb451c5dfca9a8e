/* The ASCII tokenization fast path's inner loop (stream_sentiment.batching.tokenizer.AsciiWordPieces),
 * in C: lowercase, split into words, look each word's WordPiece ids up in the memo, truncate, add the
 * special tokens. The same ids as the pure-Python loop it replaces, which stays as the fallback where
 * this module was not built; tests/batching compare the two and the Rust tokenizer on every sample.
 *
 * Why C: on a GPU host the worker's CPU, not the GPU, limits throughput, and this loop was the largest
 * stage (~21 us per tweet, ~75 us per long post, one regex match and one dict lookup per word in
 * Python). Here a word costs one short string and one dict lookup, and a post's tuple shares the memo's
 * int objects.
 *
 * Stable ABI (Py_LIMITED_API 3.11): one build serves Python 3.11 and 3.12. It runs without releasing
 * the GIL, so the memo, a plain dict the caller mutates only while holding the GIL, cannot change under
 * it.
 */
#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>

typedef struct {
    PyObject **items; /* strong references to the memo's piece tuples, in post order */
    Py_ssize_t len, cap;
} Pieces;

static int pieces_push(Pieces *v, PyObject *tuple) {
    if (v->len == v->cap) {
        Py_ssize_t cap = v->cap ? v->cap * 2 : 256;
        PyObject **items = PyMem_Realloc(v->items, (size_t)cap * sizeof(PyObject *));
        if (items == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        v->items = items;
        v->cap = cap;
    }
    Py_INCREF(tuple);
    v->items[v->len++] = tuple;
    return 0;
}

static void pieces_free(Pieces *v) {
    for (Py_ssize_t i = 0; i < v->len; i++) {
        Py_DECREF(v->items[i]);
    }
    PyMem_Free(v->items);
}

static inline char ascii_lower(char c) { return (c >= 'A' && c <= 'Z') ? (char)(c + ('a' - 'A')) : c; }

static inline int is_word_char(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }

/* The word's piece tuple (a new reference), NULL with no error if neither mapping has it, NULL with an
 * error set on failure. */
static PyObject *lookup(PyObject *memo, PyObject *extra, PyObject *key) {
    PyObject *found = PyDict_GetItemWithError(memo, key);
    if (found == NULL && !PyErr_Occurred() && extra != Py_None) {
        found = PyDict_GetItemWithError(extra, key);
    }
    if (found == NULL) {
        return NULL;
    }
    if (!PyTuple_Check(found)) {
        PyErr_SetString(PyExc_TypeError, "memo values must be tuples of token ids");
        return NULL;
    }
    Py_INCREF(found);
    return found;
}

/* Copies ``count`` items of ``source`` into ``target`` from ``at``; returns the next free index or -1. */
static Py_ssize_t copy_items(PyObject *target, Py_ssize_t at, PyObject *source, Py_ssize_t count) {
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *item = PyTuple_GetItem(source, k);
        if (item == NULL) {
            return -1;
        }
        Py_INCREF(item);
        if (PyTuple_SetItem(target, at++, item) < 0) { /* steals the reference */
            return -1;
        }
    }
    return at;
}

PyDoc_STRVAR(encode_doc,
"encode(texts, memo, extra, prefix, suffix, keep, unknown, longest) -> list of id tuples | set of words\n\n"
"Token ids of each text (printable ASCII, as AsciiWordPieces.accepts). A text is lowercased and split\n"
"into runs of [a-z0-9] and single other non-space characters; a word longer than ``longest`` is\n"
"``unknown``, any other is looked up in ``memo``, then in ``extra`` (a dict or None). ``prefix`` +\n"
"pieces, cut to ``keep`` ids, + ``suffix``. If a word is in neither mapping, returns the set of such\n"
"words instead, and the caller fills the memo and asks again.");

static PyObject *encode(PyObject *self, PyObject *args) {
    PyObject *texts, *memo, *extra, *prefix, *suffix, *unknown;
    Py_ssize_t keep, longest;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!O!OO!O!nO!n", &PyList_Type, &texts, &PyDict_Type, &memo, &extra,
                          &PyTuple_Type, &prefix, &PyTuple_Type, &suffix, &keep, &PyTuple_Type, &unknown,
                          &longest)) {
        return NULL;
    }
    if (extra != Py_None && !PyDict_Check(extra)) {
        PyErr_SetString(PyExc_TypeError, "extra must be a dict or None");
        return NULL;
    }
    Py_ssize_t count = PyList_Size(texts);
    Py_ssize_t prefix_len = PyTuple_Size(prefix), suffix_len = PyTuple_Size(suffix);
    if (count < 0 || prefix_len < 0 || suffix_len < 0) {
        return NULL;
    }
    if (keep < prefix_len || longest < 1) {
        PyErr_SetString(PyExc_ValueError, "keep must hold the prefix and longest must be positive");
        return NULL;
    }

    Pieces found = {NULL, 0, 0};
    Py_ssize_t *ends = PyMem_Malloc((size_t)(count + 1) * sizeof(Py_ssize_t));
    char *word = PyMem_Malloc((size_t)longest);
    PyObject *missing = NULL, *result = NULL, *encoded = NULL;
    if (ends == NULL || word == NULL) {
        PyErr_NoMemory();
        goto done;
    }

    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t length;
        const char *text = PyUnicode_AsUTF8AndSize(PyList_GetItem(texts, i), &length);
        if (text == NULL) {
            goto done;
        }
        Py_ssize_t ids = prefix_len, at = 0;
        /* Words past the truncation point are never looked up: a long post stops at ``keep`` ids. */
        while (at < length && ids < keep) {
            char c = ascii_lower(text[at]);
            if ((unsigned char)c >= 0x80) {
                PyErr_SetString(PyExc_ValueError, "texts must be ASCII");
                goto done;
            }
            if (c == ' ') {
                at++;
                continue;
            }
            Py_ssize_t start = at, size;
            if (is_word_char(c)) {
                while (at < length && is_word_char(ascii_lower(text[at]))) {
                    at++;
                }
            } else {
                at++; /* punctuation: a word of its own */
            }
            size = at - start;
            PyObject *ids_of_word;
            if (size > longest) {
                Py_INCREF(unknown);
                ids_of_word = unknown;
            } else {
                for (Py_ssize_t k = 0; k < size; k++) {
                    word[k] = ascii_lower(text[start + k]);
                }
                PyObject *key = PyUnicode_FromStringAndSize(word, size);
                if (key == NULL) {
                    goto done;
                }
                ids_of_word = lookup(memo, extra, key);
                if (ids_of_word == NULL) {
                    if (PyErr_Occurred()) {
                        Py_DECREF(key);
                        goto done;
                    }
                    if (missing == NULL && (missing = PySet_New(NULL)) == NULL) {
                        Py_DECREF(key);
                        goto done;
                    }
                    int added = PySet_Add(missing, key);
                    Py_DECREF(key);
                    if (added < 0) {
                        goto done;
                    }
                    continue;
                }
                Py_DECREF(key);
            }
            int pushed = pieces_push(&found, ids_of_word);
            Py_ssize_t pieces = PyTuple_Size(ids_of_word);
            Py_DECREF(ids_of_word);
            if (pushed < 0) {
                goto done;
            }
            ids += pieces;
        }
        ends[i] = found.len;
    }

    if (missing != NULL) {
        result = missing;
        missing = NULL;
        goto done;
    }

    encoded = PyList_New(count);
    if (encoded == NULL) {
        goto done;
    }
    Py_ssize_t first = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t body = 0;
        for (Py_ssize_t p = first; p < ends[i]; p++) {
            body += PyTuple_Size(found.items[p]);
        }
        if (prefix_len + body > keep) {
            body = keep - prefix_len;
        }
        PyObject *row = PyTuple_New(prefix_len + body + suffix_len);
        if (row == NULL) {
            goto done;
        }
        PyList_SetItem(encoded, i, row); /* the list owns it from here, even if filling fails */
        Py_ssize_t at = copy_items(row, 0, prefix, prefix_len);
        for (Py_ssize_t p = first; p < ends[i] && at >= 0 && at < prefix_len + body; p++) {
            Py_ssize_t take = PyTuple_Size(found.items[p]);
            if (take > prefix_len + body - at) {
                take = prefix_len + body - at;
            }
            at = copy_items(row, at, found.items[p], take);
        }
        if (at >= 0) {
            at = copy_items(row, at, suffix, suffix_len);
        }
        if (at < 0) {
            goto done;
        }
        first = ends[i];
    }
    result = encoded;
    encoded = NULL;

done:
    Py_XDECREF(encoded);
    Py_XDECREF(missing);
    pieces_free(&found);
    PyMem_Free(ends);
    PyMem_Free(word);
    return result;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS, encode_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_wordpieces",
    "The ASCII WordPiece fast path's inner loop in C (see stream_sentiment.batching.tokenizer).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__wordpieces(void) { return PyModule_Create(&module); }
