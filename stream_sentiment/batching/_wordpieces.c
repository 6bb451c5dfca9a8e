/* The ASCII tokenization fast path (stream_sentiment.batching.tokenizer.AsciiWordPieces) in C: the
 * twitter-v1 normalization (links, mentions, spaces; HTML entities stay in Python), lowercasing, the split
 * into words, each word's WordPiece ids from a memo (WordPiece itself for a word not seen yet),
 * truncation and the special tokens. The same ids as the Python path, which stays as the fallback where
 * this module was not built and for the posts it does not take (non-ASCII, "&"); tests/batching compare
 * both with the Rust tokenizer on every sample tweet and on generated text.
 *
 * Why C: on a GPU host the worker's CPU, not the GPU, limits throughput, and tokenizing was its largest
 * stage (~21 us per tweet, ~75 us per long post in Python: a regex pass and a dict lookup with a new str
 * per word). Here a word costs a hash of its bytes and a probe of the memo, and a post's tuple shares
 * the memo's int objects.
 *
 * Stable ABI (Py_LIMITED_API 3.11): one in-place build (pip install -e .) serves Python 3.11 and 3.12. It never
 * releases the GIL, so no other thread sees a memo or the vocabulary mid-call (a garbage collection inside an
 * allocation may run a finalizer; the memo's entries and ``found`` hold their own references, and memo_add
 * leaves a word another call added meanwhile as it is).
 */
#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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

/* The C loop's memo: a word's bytes -> its tuple of ids, open addressing. A Python dict keyed by str cost a new
 * str object, its hash and a lookup per word: ~100 ns, most of a long post's time. The hash is SipHash-1-3
 * under a per-memo random key (as CPython hashes str): anyone can post words, and with an unkeyed hash they
 * could post thousands that share a slot and make every lookup a long probe. Probes are capped anyway: a word
 * not found within MAX_PROBE slots is looked up the slow way and not memoized. */
#define MAX_PROBE 64

typedef struct {
    char *key; /* NULL: empty */
    Py_ssize_t size;
    uint64_t hash;
    PyObject *ids;
} Slot;

typedef struct {
    PyObject_HEAD
    Slot *slots;
    Py_ssize_t capacity, used; /* capacity: a power of two, at least twice ``used`` */
    uint64_t k0, k1;           /* the hash key */
} WordMemo;

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                                  \
    do {                                                                                                          \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                                                 \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                                                    \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                                                    \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                                                 \
    } while (0)

static uint64_t load_le64(const unsigned char *p) {
    uint64_t value = 0;
    for (int k = 7; k >= 0; k--) {
        value = (value << 8) | p[k];
    }
    return value;
}

/* SipHash-1-3 (Aumasson and Bernstein; the variant CPython uses for str) of ``size`` bytes. */
static uint64_t siphash13(uint64_t k0, uint64_t k1, const char *bytes, Py_ssize_t size) {
    const unsigned char *in = (const unsigned char *)bytes;
    uint64_t v0 = 0x736f6d6570736575ULL ^ k0, v1 = 0x646f72616e646f6dULL ^ k1;
    uint64_t v2 = 0x6c7967656e657261ULL ^ k0, v3 = 0x7465646279746573ULL ^ k1;
    uint64_t last = ((uint64_t)size) << 56;
    Py_ssize_t whole = size - (size % 8);
    for (Py_ssize_t at = 0; at < whole; at += 8) {
        uint64_t m = load_le64(in + at);
        v3 ^= m;
        SIPROUND;
        v0 ^= m;
    }
    for (Py_ssize_t k = 0; k < size % 8; k++) {
        last |= ((uint64_t)in[whole + k]) << (8 * k);
    }
    v3 ^= last;
    SIPROUND;
    v0 ^= last;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static void memo_clear_slots(WordMemo *memo) {
    for (Py_ssize_t k = 0; k < memo->capacity; k++) {
        if (memo->slots[k].key != NULL) {
            PyMem_Free(memo->slots[k].key);
            Py_DECREF(memo->slots[k].ids);
            memo->slots[k].key = NULL;
        }
    }
    memo->used = 0;
}

/* The slot of ``bytes`` within ``probes`` steps: its entry, or the empty slot where it would go; NULL if
 * neither is that near. */
static Slot *memo_find(WordMemo *memo, const char *bytes, Py_ssize_t size, uint64_t hash, Py_ssize_t probes) {
    size_t mask = (size_t)memo->capacity - 1, at = (size_t)hash & mask;
    for (Py_ssize_t step = 0; step < probes; step++, at = (at + 1) & mask) {
        Slot *slot = &memo->slots[at];
        if (slot->key == NULL || (slot->hash == hash && slot->size == size && memcmp(slot->key, bytes, (size_t)size) == 0)) {
            return slot;
        }
    }
    return NULL;
}

static int memo_grow(WordMemo *memo) {
    Py_ssize_t capacity = memo->capacity ? memo->capacity * 2 : 1024;
    Slot *old = memo->slots, *slots = PyMem_Calloc((size_t)capacity, sizeof(Slot));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t old_capacity = memo->capacity;
    memo->slots = slots;
    memo->capacity = capacity;
    for (Py_ssize_t k = 0; k < old_capacity; k++) {
        if (old[k].key != NULL) { /* at most half full: an empty slot is always found */
            *memo_find(memo, old[k].key, old[k].size, old[k].hash, capacity) = old[k];
        }
    }
    PyMem_Free(old);
    return 0;
}

/* Adds ``ids`` for ``bytes``; starts over first if ``max_words`` are held. A word already there (added by a
 * finalizer's call during this one) or beyond MAX_PROBE is left as it is. */
static int memo_add(WordMemo *memo, const char *bytes, Py_ssize_t size, uint64_t hash, PyObject *ids,
                    Py_ssize_t max_words) {
    if (memo->used >= max_words) {
        memo_clear_slots(memo); /* rare: a stream of new words; the next batches refill it */
    }
    if (2 * (memo->used + 1) > memo->capacity && memo_grow(memo) < 0) {
        return -1;
    }
    Slot *slot = memo_find(memo, bytes, size, hash, MAX_PROBE);
    if (slot == NULL || slot->key != NULL) {
        return 0;
    }
    char *key = PyMem_Malloc((size_t)(size > 0 ? size : 1));
    if (key == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(key, bytes, (size_t)size);
    slot->key = key;
    slot->size = size;
    slot->hash = hash;
    Py_INCREF(ids);
    slot->ids = ids;
    memo->used++;
    return 0;
}

static PyObject *memo_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    const char *key;
    Py_ssize_t key_size;
    if (kwargs != NULL && PyDict_Size(kwargs) > 0) {
        PyErr_SetString(PyExc_TypeError, "WordMemo(key) takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "y#:WordMemo", &key, &key_size)) {
        return NULL;
    }
    if (key_size != 16) {
        PyErr_SetString(PyExc_ValueError, "WordMemo(key): the hash key is 16 random bytes (os.urandom(16))");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    WordMemo *memo = (WordMemo *)alloc(type, 0);
    if (memo == NULL) {
        return NULL;
    }
    memo->slots = NULL;
    memo->capacity = memo->used = 0;
    memo->k0 = load_le64((const unsigned char *)key);
    memo->k1 = load_le64((const unsigned char *)key + 8);
    if (memo_grow(memo) < 0) {
        Py_DECREF(memo);
        return NULL;
    }
    return (PyObject *)memo;
}

static void memo_dealloc(PyObject *self) {
    WordMemo *memo = (WordMemo *)self;
    PyTypeObject *type = Py_TYPE(self);
    if (memo->slots != NULL) {
        memo_clear_slots(memo);
        PyMem_Free(memo->slots);
    }
    freefunc free_memory = (freefunc)PyType_GetSlot(type, Py_tp_free);
    free_memory(self);
    Py_DECREF(type);
}

static Py_ssize_t memo_length(PyObject *self) { return ((WordMemo *)self)->used; }

static PyObject *memo_clear(PyObject *self, PyObject *unused) {
    (void)unused;
    memo_clear_slots((WordMemo *)self);
    Py_RETURN_NONE;
}

static PyMethodDef memo_methods[] = {
    {"clear", memo_clear, METH_NOARGS, "Forget every word."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot memo_slots[] = {
    {Py_tp_new, memo_new},
    {Py_tp_dealloc, memo_dealloc},
    {Py_tp_methods, memo_methods},
    {Py_mp_length, memo_length},
    {Py_tp_doc, "WordMemo(key): the C loop's memo of each word's WordPiece ids, hashed under ``key`` (16 random\n"
                "bytes); len() words, clear()."},
    {0, NULL},
};

static PyType_Spec memo_spec = {
    "stream_sentiment.batching._wordpieces.WordMemo", sizeof(WordMemo), 0, Py_TPFLAGS_DEFAULT, memo_slots,
};

static PyObject *memo_type = NULL;

static inline char ascii_lower(char c) { return (c >= 'A' && c <= 'Z') ? (char)(c + ('a' - 'A')) : c; }

static inline int is_word_char(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }

/* WordPiece of one word, exactly as the Rust tokenizer's model does it for ASCII (a character is a
 * byte): the longest vocabulary entry from the start, then the longest ``continuation``-prefixed entry
 * from where that ended, and so on; a word with any part that matches nothing is ``unknown``. Returns a
 * new reference to a tuple of ids, or NULL with an error set. ``buffer`` holds continuation + word. */
static PyObject *word_pieces(const char *word, Py_ssize_t size, PyObject *vocab, const char *continuation,
                             Py_ssize_t continuation_size, PyObject *unknown, char *buffer) {
    PyObject **ids = PyMem_Malloc((size_t)size * sizeof(PyObject *)); /* strong references to vocabulary ids */
    Py_ssize_t count = 0, start = 0;
    PyObject *pieces = NULL;
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
                goto done;
            }
            id = PyDict_GetItemWithError(vocab, piece);
            Py_DECREF(piece);
            if (id != NULL) {
                break;
            }
            if (PyErr_Occurred()) {
                goto done;
            }
        }
        if (id == NULL) {
            Py_INCREF(unknown);
            pieces = unknown;
            goto done;
        }
        Py_INCREF(id);
        ids[count++] = id;
        start = end;
    }
    pieces = PyTuple_New(count);
    for (Py_ssize_t k = 0; pieces != NULL && k < count; k++) {
        Py_INCREF(ids[k]);
        if (PyTuple_SetItem(pieces, k, ids[k]) < 0) {
            Py_CLEAR(pieces);
        }
    }
done:
    for (Py_ssize_t k = 0; k < count; k++) {
        Py_DECREF(ids[k]);
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

/* What a call tokenizes with: the caller's memo and vocabulary, the special tokens, the limits. */
typedef struct {
    PyObject *memo, *vocab, *prefix, *suffix, *unknown;
    const char *continuation;
    Py_ssize_t continuation_size, keep, longest, max_words, prefix_len, suffix_len;
    char *word, *buffer; /* a lowercased word; continuation + word for WordPiece */
} Model;

static int model_open(Model *m) {
    if (!PyObject_TypeCheck(m->memo, (PyTypeObject *)memo_type)) {
        PyErr_SetString(PyExc_TypeError, "memo must be a WordMemo");
        return -1;
    }
    m->prefix_len = PyTuple_Size(m->prefix);
    m->suffix_len = PyTuple_Size(m->suffix);
    if (m->prefix_len < 0 || m->suffix_len < 0) {
        return -1;
    }
    if (m->keep < m->prefix_len || m->longest < 1) {
        PyErr_SetString(PyExc_ValueError, "keep must hold the prefix and longest must be positive");
        return -1;
    }
    m->word = PyMem_Malloc((size_t)m->longest);
    m->buffer = PyMem_Malloc((size_t)(m->continuation_size + m->longest));
    if (m->word == NULL || m->buffer == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void model_close(Model *m) {
    PyMem_Free(m->word);
    PyMem_Free(m->buffer);
}

/* Pushes the piece tuples of one ASCII text onto ``found`` (emptied first), up to where ``keep`` ids are
 * reached: words past the truncation point are never looked up. 0, or -1 with an error set. */
static int tokenize_text(Model *m, const char *text, Py_ssize_t length, Pieces *found) {
    for (Py_ssize_t k = 0; k < found->len; k++) {
        Py_DECREF(found->items[k]);
    }
    found->len = 0;
    Py_ssize_t ids = m->prefix_len, at = 0;
    while (at < length && ids < m->keep) {
        char c = ascii_lower(text[at]);
        if ((unsigned char)c >= 0x80) {
            PyErr_SetString(PyExc_ValueError, "texts must be ASCII");
            return -1;
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
        if (size > m->longest) {
            Py_INCREF(m->unknown); /* as WordPiece does; not memoized, so spam blobs cannot fill the memo */
            ids_of_word = m->unknown;
        } else {
            for (Py_ssize_t k = 0; k < size; k++) {
                m->word[k] = ascii_lower(text[start + k]);
            }
            WordMemo *memo = (WordMemo *)m->memo;
            uint64_t hash = siphash13(memo->k0, memo->k1, m->word, size);
            Slot *slot = memo_find(memo, m->word, size, hash, MAX_PROBE);
            if (slot != NULL && slot->key != NULL) {
                Py_INCREF(slot->ids);
                ids_of_word = slot->ids;
            } else {
                ids_of_word = word_pieces(m->word, size, m->vocab, m->continuation, m->continuation_size,
                                          m->unknown, m->buffer);
                if (ids_of_word == NULL || memo_add(memo, m->word, size, hash, ids_of_word, m->max_words) < 0) {
                    Py_XDECREF(ids_of_word);
                    return -1;
                }
            }
        }
        int pushed = pieces_push(found, ids_of_word);
        Py_ssize_t pieces = PyTuple_Size(ids_of_word);
        Py_DECREF(ids_of_word);
        if (pushed < 0) {
            return -1;
        }
        ids += pieces;
    }
    return 0;
}

/* One post's ids: prefix + the pieces in ``found``, cut to ``keep``, + suffix (a new tuple, or NULL). */
static PyObject *assemble(Model *m, Pieces *found) {
    Py_ssize_t body = 0;
    for (Py_ssize_t p = 0; p < found->len; p++) {
        body += PyTuple_Size(found->items[p]);
    }
    if (m->prefix_len + body > m->keep) {
        body = m->keep - m->prefix_len;
    }
    Py_ssize_t end = m->prefix_len + body;
    PyObject *row = PyTuple_New(end + m->suffix_len);
    if (row == NULL) {
        return NULL;
    }
    Py_ssize_t at = copy_items(row, 0, m->prefix, m->prefix_len);
    for (Py_ssize_t p = 0; p < found->len && at >= 0 && at < end; p++) {
        Py_ssize_t take = PyTuple_Size(found->items[p]);
        if (take > end - at) {
            take = end - at;
        }
        at = copy_items(row, at, found->items[p], take);
    }
    if (at >= 0) {
        at = copy_items(row, at, m->suffix, m->suffix_len);
    }
    if (at < 0) {
        Py_DECREF(row);
        return NULL;
    }
    return row;
}

/* Python's str.isspace() on ASCII: what str.split() and the regular expressions' \s take as space. */
static inline int is_space(unsigned char c) { return c == ' ' || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f); }

/* Python's \w on ASCII (the mention's word) and str.isalnum() or "_" (what may not come before it). */
static inline int is_python_word(unsigned char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

static inline int starts_url(const char *t, Py_ssize_t n, Py_ssize_t i, Py_ssize_t *after) {
    /* (?:[hH][tT][tT][pP][sS]?://|[wW][wW][wW]\.) at i, needing one non-space after it (\S+). */
    Py_ssize_t j = -1;
    if (i + 4 <= n && (t[i] | 0x20) == 'h' && (t[i + 1] | 0x20) == 't' && (t[i + 2] | 0x20) == 't'
        && (t[i + 3] | 0x20) == 'p') {
        Py_ssize_t k = i + 4;
        if (k + 3 <= n && (t[k] | 0x20) == 's' && t[k + 1] == ':' && t[k + 2] == '/' && k + 3 < n && t[k + 3] == '/') {
            j = k + 4;
        } else if (k + 3 <= n && t[k] == ':' && t[k + 1] == '/' && t[k + 2] == '/') {
            j = k + 3;
        }
    }
    if (j >= 0 && j < n && !is_space((unsigned char)t[j])) {
        *after = j;
        return 1;
    }
    if (i + 4 <= n && (t[i] | 0x20) == 'w' && (t[i + 1] | 0x20) == 'w' && (t[i + 2] | 0x20) == 'w' && t[i + 3] == '.'
        && i + 4 < n && !is_space((unsigned char)t[i + 4])) {
        *after = i + 4;
        return 1;
    }
    return 0;
}

/* The ``twitter-v1`` normalization (stream_sentiment.batching.normalization) of ASCII text without "&"
 * (html.unescape stays in Python): links -> "http", @handles -> "@user" unless a word character precedes
 * them, whitespace runs -> one space, stripped. Writes into ``out`` (3 x n + 8 bytes: "@x" grows to
 * "@user") and returns the length. */
static Py_ssize_t normalize_twitter_v1(const char *t, Py_ssize_t n, char *out, char *linked) {
    /* 1. Links, left to right, each running to the next space (\S+ is greedy). */
    Py_ssize_t m = 0;
    for (Py_ssize_t i = 0; i < n;) {
        Py_ssize_t after;
        if (starts_url(t, n, i, &after)) {
            while (after < n && !is_space((unsigned char)t[after])) {
                after++;
            }
            memcpy(linked + m, "http", 4);
            m += 4;
            i = after;
        } else {
            linked[m++] = t[i++];
        }
    }
    /* 2. Mentions in what step 1 left (the character before a match is read there, as re.sub does). */
    Py_ssize_t w = 0;
    for (Py_ssize_t i = 0; i < m;) {
        if (linked[i] == '@' && i + 1 < m && is_python_word((unsigned char)linked[i + 1])) {
            Py_ssize_t end = i + 1;
            while (end < m && is_python_word((unsigned char)linked[end])) {
                end++;
            }
            if (i > 0 && is_python_word((unsigned char)linked[i - 1])) {
                memcpy(out + w, linked + i, (size_t)(end - i));
                w += end - i;
            } else {
                memcpy(out + w, "@user", 5);
                w += 5;
            }
            i = end;
        } else {
            out[w++] = linked[i++];
        }
    }
    /* 3. " ".join(text.split()), in place. */
    Py_ssize_t r = 0, length = 0;
    while (r < w) {
        while (r < w && is_space((unsigned char)out[r])) {
            r++;
        }
        if (r >= w) {
            break;
        }
        if (length > 0) {
            out[length++] = ' ';
        }
        while (r < w && !is_space((unsigned char)out[r])) {
            out[length++] = out[r++];
        }
    }
    return length;
}

PyDoc_STRVAR(normalize_encode_doc,
"normalize_encode(texts, normalization, refused, memo, max_words, vocab, continuation, prefix, suffix, keep,\n"
"unknown, longest) -> list of id tuples or None\n\n"
"Token ids of each raw text normalized by ``normalization`` (0: none, 1: twitter-v1), for the texts this can\n"
"do all of: ASCII, no \"&\" (twitter-v1 unescapes HTML in Python), and, once normalized, printable with none\n"
"of ``refused``; None for any other text (the caller normalizes and tokenizes it the general way). A text is\n"
"lowercased and split into runs of [a-z0-9] and single other non-space characters; a word longer than\n"
"``longest`` is ``unknown``; any other word's ids come from ``memo`` (a WordMemo), or are found by WordPiece\n"
"over ``vocab`` (with the ``continuation`` prefix) and added to it (cleared first when it holds\n"
"``max_words``). ``prefix`` + ids, cut to ``keep``, + ``suffix``.");

static PyObject *normalize_encode(PyObject *self, PyObject *args) {
    PyObject *texts;
    int normalization;
    const char *refused;
    Py_ssize_t refused_size;
    Model m = {0};
    (void)self;
    if (!PyArg_ParseTuple(args, "O!is#OnO!s#O!O!nO!n", &PyList_Type, &texts, &normalization, &refused,
                          &refused_size, &m.memo, &m.max_words, &PyDict_Type, &m.vocab, &m.continuation,
                          &m.continuation_size, &PyTuple_Type, &m.prefix, &PyTuple_Type, &m.suffix, &m.keep,
                          &PyTuple_Type, &m.unknown, &m.longest)) {
        return NULL;
    }
    if (normalization != 0 && normalization != 1) {
        PyErr_SetString(PyExc_ValueError, "normalization must be 0 (none) or 1 (twitter-v1)");
        return NULL;
    }
    Py_ssize_t count = PyList_Size(texts);
    PyObject *encoded = NULL;
    Pieces found = {NULL, 0, 0};
    char *normalized = NULL, *linked = NULL;
    Py_ssize_t capacity = 0;
    if (count < 0 || model_open(&m) < 0 || (encoded = PyList_New(count)) == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t length;
        const char *text = PyUnicode_AsUTF8AndSize(PyList_GetItem(texts, i), &length);
        if (text == NULL) {
            Py_CLEAR(encoded);
            goto done;
        }
        int plain = 1;
        for (Py_ssize_t k = 0; k < length && plain; k++) {
            unsigned char c = (unsigned char)text[k];
            plain = c < 0x80 && !(normalization == 1 && c == '&');
        }
        PyObject *row = Py_None;
        if (plain) {
            const char *ready = text;
            Py_ssize_t size = length;
            if (normalization == 1) {
                if (3 * length + 8 > capacity) {
                    capacity = 3 * length + 8;
                    PyMem_Free(normalized);
                    PyMem_Free(linked);
                    normalized = PyMem_Malloc((size_t)capacity);
                    linked = PyMem_Malloc((size_t)capacity);
                    if (normalized == NULL || linked == NULL) {
                        PyErr_NoMemory();
                        Py_CLEAR(encoded);
                        goto done;
                    }
                }
                size = normalize_twitter_v1(text, length, normalized, linked);
                ready = normalized;
            }
            for (Py_ssize_t k = 0; k < size && plain; k++) { /* AsciiWordPieces.accepts */
                unsigned char c = (unsigned char)ready[k];
                plain = c >= 0x20 && c < 0x7f && memchr(refused, c, (size_t)refused_size) == NULL;
            }
            if (plain) {
                if (tokenize_text(&m, ready, size, &found) < 0 || (row = assemble(&m, &found)) == NULL) {
                    Py_CLEAR(encoded);
                    goto done;
                }
            }
        }
        if (row == Py_None) {
            Py_INCREF(Py_None);
        }
        PyList_SetItem(encoded, i, row);
    }
done:
    PyMem_Free(normalized);
    PyMem_Free(linked);
    pieces_free(&found);
    model_close(&m);
    return encoded;
}

/* One row's id at ``k`` (a tuple, a list or any sequence of ints); -1 with an error set on failure. */
static int row_id(PyObject *row, Py_ssize_t k, long long *value) {
    PyObject *item;
    int owned = 0;
    if (PyTuple_Check(row)) {
        item = PyTuple_GetItem(row, k);
    } else if (PyList_Check(row)) {
        item = PyList_GetItem(row, k);
    } else {
        item = PySequence_GetItem(row, k);
        owned = 1;
    }
    if (item == NULL) {
        return -1;
    }
    *value = PyLong_AsLongLong(item);
    if (owned) {
        Py_DECREF(item);
    }
    return (*value == -1 && PyErr_Occurred()) ? -1 : 0;
}

PyDoc_STRVAR(pad_doc,
"pad(rows, bucket) -> (input_ids, attention_mask)\n\n"
"The rows (a list of sequences of token ids) left-aligned and zero-padded to ``bucket``: two bytearrays of\n"
"native int64, row-major ``[len(rows), bucket]``, the mask 1 on real tokens. ValueError for a longer row.");

static PyObject *pad(PyObject *self, PyObject *args) {
    PyObject *rows;
    Py_ssize_t bucket;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!n", &PyList_Type, &rows, &bucket)) {
        return NULL;
    }
    Py_ssize_t count = PyList_Size(rows);
    if (count < 0 || bucket < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ValueError, "bucket must not be negative");
        }
        return NULL;
    }
    if (bucket > 0 && count > PY_SSIZE_T_MAX / bucket / (Py_ssize_t)sizeof(long long)) {
        return PyErr_NoMemory();
    }
    Py_ssize_t cells = count * bucket;
    PyObject *ids = PyByteArray_FromStringAndSize(NULL, cells * (Py_ssize_t)sizeof(long long));
    PyObject *mask = PyByteArray_FromStringAndSize(NULL, cells * (Py_ssize_t)sizeof(long long));
    if (ids == NULL || mask == NULL) {
        goto fail;
    }
    long long *id_cells = (long long *)PyByteArray_AsString(ids), *mask_cells = (long long *)PyByteArray_AsString(mask);
    memset(id_cells, 0, (size_t)cells * sizeof(long long));
    memset(mask_cells, 0, (size_t)cells * sizeof(long long));
    for (Py_ssize_t r = 0; r < count; r++) {
        PyObject *row = PyList_GetItem(rows, r);
        if (row == NULL) {
            goto fail;
        }
        Py_INCREF(row); /* an id's __index__ is Python code: it may drop the list's reference */
        Py_ssize_t length = PyObject_Length(row);
        if (length > bucket) {
            PyErr_Format(PyExc_ValueError, "row %zd has %zd tokens, more than bucket %zd", r, length, bucket);
            length = -1;
        }
        for (Py_ssize_t k = 0; k < length; k++) {
            if (row_id(row, k, &id_cells[r * bucket + k]) < 0) {
                length = -1;
                break;
            }
            mask_cells[r * bucket + k] = 1;
        }
        Py_DECREF(row);
        if (length < 0) {
            goto fail;
        }
    }
    return Py_BuildValue("(NN)", ids, mask);
fail:
    Py_XDECREF(ids);
    Py_XDECREF(mask);
    return NULL;
}

static PyMethodDef methods[] = {
    {"normalize_encode", normalize_encode, METH_VARARGS, normalize_encode_doc},
    {"pad", pad, METH_VARARGS, pad_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_wordpieces",
    "The ASCII WordPiece fast path's inner loop in C (see stream_sentiment.batching.tokenizer).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__wordpieces(void) {
    PyObject *created = PyModule_Create(&module);
    if (created == NULL) {
        return NULL;
    }
    memo_type = PyType_FromSpec(&memo_spec);
    if (memo_type == NULL || PyModule_AddObjectRef(created, "WordMemo", memo_type) < 0) {
        Py_DECREF(created);
        return NULL;
    }
    return created;
}
