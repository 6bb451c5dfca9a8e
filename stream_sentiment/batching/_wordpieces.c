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
 * Words not in the memo yet are split by WordPiece here too (the Rust tokenizer's model called once per
 * word from Python cost more than the rest of a cold post) and memoized.
 *
 * Stable ABI (Py_LIMITED_API 3.11): one build serves Python 3.11 and 3.12. It never releases the GIL, so
 * no other thread sees the memo or the vocabulary mid-call.
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

/* WordPiece of one word, exactly as the Rust tokenizer's model does it for ASCII (a character is a
 * byte): the longest vocabulary entry from the start, then the longest ``continuation``-prefixed entry
 * from where that ended, and so on; a word with any part that matches nothing is ``unknown``. Returns a
 * new reference to a tuple of ids, or NULL with an error set. ``buffer`` holds continuation + word. */
static PyObject *word_pieces(const char *word, Py_ssize_t size, PyObject *vocab, const char *continuation,
                             Py_ssize_t continuation_size, PyObject *unknown, char *buffer) {
    PyObject **ids = PyMem_Malloc((size_t)size * sizeof(PyObject *)); /* borrowed from the vocabulary */
    Py_ssize_t count = 0, start = 0;
    if (ids == NULL) {
        return PyErr_NoMemory();
    }
    while (start < size) {
        PyObject *id = NULL;
        Py_ssize_t end = size;
        for (; end > start; end--) {
            Py_ssize_t at = 0;
            if (start > 0) {
                memcpy(buffer, continuation, (size_t)continuation_size);
                at = continuation_size;
            }
            memcpy(buffer + at, word + start, (size_t)(end - start));
            PyObject *piece = PyUnicode_FromStringAndSize(buffer, at + end - start);
            if (piece == NULL) {
                PyMem_Free(ids);
                return NULL;
            }
            id = PyDict_GetItemWithError(vocab, piece);
            Py_DECREF(piece);
            if (id != NULL) {
                break;
            }
            if (PyErr_Occurred()) {
                PyMem_Free(ids);
                return NULL;
            }
        }
        if (id == NULL) {
            PyMem_Free(ids);
            Py_INCREF(unknown);
            return unknown;
        }
        ids[count++] = id;
        start = end;
    }
    PyObject *pieces = PyTuple_New(count);
    for (Py_ssize_t k = 0; pieces != NULL && k < count; k++) {
        Py_INCREF(ids[k]);
        if (PyTuple_SetItem(pieces, k, ids[k]) < 0) {
            Py_CLEAR(pieces);
        }
    }
    PyMem_Free(ids);
    return pieces;
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
"encode(texts, memo, vocab, continuation, prefix, suffix, keep, unknown, longest) -> list of id tuples\n\n"
"Token ids of each text (printable ASCII, as AsciiWordPieces.accepts). A text is lowercased and split\n"
"into runs of [a-z0-9] and single other non-space characters; a word longer than ``longest`` is\n"
"``unknown``; any other word's ids come from ``memo``, or are found by WordPiece over ``vocab`` (with\n"
"the ``continuation`` prefix) and added to ``memo``. ``prefix`` + ids, cut to ``keep``, + ``suffix``.");

static PyObject *encode(PyObject *self, PyObject *args) {
    PyObject *texts, *memo, *vocab, *prefix, *suffix, *unknown;
    const char *continuation;
    Py_ssize_t continuation_size, keep, longest;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!O!O!s#O!O!nO!n", &PyList_Type, &texts, &PyDict_Type, &memo, &PyDict_Type,
                          &vocab, &continuation, &continuation_size, &PyTuple_Type, &prefix, &PyTuple_Type,
                          &suffix, &keep, &PyTuple_Type, &unknown, &longest)) {
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
    char *buffer = PyMem_Malloc((size_t)(continuation_size + longest));
    PyObject *encoded = NULL, *result = NULL;
    if (ends == NULL || word == NULL || buffer == NULL) {
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
                Py_INCREF(unknown); /* as WordPiece does; not memoized, so spam blobs cannot fill the memo */
                ids_of_word = unknown;
            } else {
                for (Py_ssize_t k = 0; k < size; k++) {
                    word[k] = ascii_lower(text[start + k]);
                }
                PyObject *key = PyUnicode_FromStringAndSize(word, size);
                if (key == NULL) {
                    goto done;
                }
                ids_of_word = PyDict_GetItemWithError(memo, key);
                if (ids_of_word != NULL && PyTuple_Check(ids_of_word)) {
                    Py_INCREF(ids_of_word);
                } else if (ids_of_word != NULL || PyErr_Occurred()) {
                    if (!PyErr_Occurred()) {
                        PyErr_SetString(PyExc_TypeError, "memo values must be tuples of token ids");
                    }
                    Py_DECREF(key);
                    goto done;
                } else {
                    ids_of_word = word_pieces(word, size, vocab, continuation, continuation_size, unknown, buffer);
                    if (ids_of_word == NULL || PyDict_SetItem(memo, key, ids_of_word) < 0) {
                        Py_XDECREF(ids_of_word);
                        Py_DECREF(key);
                        goto done;
                    }
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
    pieces_free(&found);
    PyMem_Free(ends);
    PyMem_Free(word);
    PyMem_Free(buffer);
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
