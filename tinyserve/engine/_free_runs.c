/* Compiled FreeRuns, and the block pool's free pass that files freed blocks into it.
 *
 * FreeRuns has the same structure and makes the same choices as the reference in free_runs.py: the set of
 * free block ids in [0, num_blocks), kept as maximal runs [start, end) filed in size classes (exact lengths
 * below 64, then eight classes per power of two); a class keeps its runs in the order they were filed (the
 * reference's dict order), so best_fit and largest pick the same run. The reference states the
 * invariants; this file only adds where it keeps things:
 *   member    a bytearray, 1 per member id (shared with Python code as `_member`);
 *   slot      per id, one 16-byte record: at a run's start its exclusive `end` and its `next` / `prev`
 *             neighbours in its class's filing order (-1: none); at a run's last id its `start`;
 *   head / tail / count  per class;  mask  one bit per non-empty class.
 * Misuse that could corrupt the structure (ids out of range, adding a member, removing a non-member)
 * raises ValueError instead of the reference's AssertionError.
 *
 * release_blocks is BestFitBlockPool.free_blocks' pass (block_pool.py has the Python it mirrors).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define EXACT_CLASSES 64
#define SUB_BITS 3
#define CLASS_SCAN_LIMIT 16
#define FIT_SCAN_LIMIT 64

typedef Py_ssize_t idx;

static idx size_class(idx length) {
    if (length < EXACT_CLASSES) return length;
    int top = 64 - __builtin_clzll((unsigned long long)length); /* bit_length */
    idx sub = (length >> (top - 1 - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    return EXACT_CLASSES + ((idx)(top - 7) << SUB_BITS) + sub;
}

/* One id's run fields, together so that filing a run touches one cache line at its start (ids fit 32 bits:
 * FreeRuns refuses pools of 2**31 blocks or more). */
typedef struct {
    int32_t end, start, next, prev;
} RunSlot;

typedef struct {
    PyObject_HEAD
    idx num_blocks, num_free, num_runs;
    PyObject *member_obj; /* bytearray of num_blocks bytes; never resized */
    uint8_t *member;
    RunSlot *slot; /* per id; a run's fields at its start (end, next, prev) and last id (start) */
    idx num_classes, num_words;
    idx *head, *tail, *count;
    uint64_t *mask;
} FreeRunsObject;

static PyTypeObject FreeRunsType;

/* ---- filing ------------------------------------------------------------------------------------ */

static void file_in(FreeRunsObject *self, idx start, idx end) {
    self->slot[start].end = end;
    self->slot[end - 1].start = start;
    idx cls = size_class(end - start);
    idx last = self->tail[cls];
    self->slot[start].prev = last;
    self->slot[start].next = -1;
    if (last < 0) {
        self->head[cls] = start;
        self->mask[cls >> 6] |= 1ULL << (cls & 63);
    } else {
        self->slot[last].next = start;
    }
    self->tail[cls] = start;
    self->count[cls]++;
}

static void file_out(FreeRunsObject *self, idx start, idx end) {
    idx cls = size_class(end - start);
    idx prev = self->slot[start].prev, next = self->slot[start].next;
    if (prev < 0) self->head[cls] = next; else self->slot[prev].next = next;
    if (next < 0) self->tail[cls] = prev; else self->slot[next].prev = prev;
    if (--self->count[cls] == 0) self->mask[cls >> 6] &= ~(1ULL << (cls & 63));
}

/* Smallest non-empty class >= cls, or -1. */
static idx next_class(FreeRunsObject *self, idx cls) {
    if (cls >= self->num_classes) return -1;
    idx word = cls >> 6;
    uint64_t bits = self->mask[word] & (~0ULL << (cls & 63));
    while (!bits) {
        if (++word >= self->num_words) return -1;
        bits = self->mask[word];
    }
    return (word << 6) + __builtin_ctzll(bits);
}

/* Largest non-empty class, or -1. */
static idx top_class(FreeRunsObject *self) {
    for (idx word = self->num_words - 1; word >= 0; word--)
        if (self->mask[word]) return (word << 6) + 63 - __builtin_clzll(self->mask[word]);
    return -1;
}

/* Start of the run holding member `block_id`: one past the last non-member before it. */
static idx run_start_of(FreeRunsObject *self, idx block_id) {
    const uint8_t *member = self->member;
    while (block_id > 0 && member[block_id - 1]) block_id--;
    return block_id;
}

static void add_run_unchecked(FreeRunsObject *self, idx start, idx end) {
    uint8_t *member = self->member;
    int left = start > 0 && member[start - 1];
    int right = end < self->num_blocks && member[end];
    idx run_start = start, run_end = end;
    if (left) {
        run_start = self->slot[start - 1].start;
        file_out(self, run_start, start);
    }
    if (right) {
        run_end = self->slot[end].end;
        file_out(self, end, run_end);
    }
    file_in(self, run_start, run_end);
    memset(member + start, 1, (size_t)(end - start));
    self->num_free += end - start;
    self->num_runs += 1 - left - right;
}

/* ---- argument checks --------------------------------------------------------------------------- */

static int get_index(PyObject *arg, idx *out) {
    idx value = PyLong_AsSsize_t(arg);
    if (value == -1 && PyErr_Occurred()) return -1;
    *out = value;
    return 0;
}

static int check_id(FreeRunsObject *self, idx block_id) {
    if (block_id < 0 || block_id >= self->num_blocks) {
        PyErr_Format(PyExc_ValueError, "block id %zd out of range [0, %zd)", block_id, self->num_blocks);
        return -1;
    }
    return 0;
}

static int check_span(FreeRunsObject *self, idx start, idx end) {
    if (start < 0 || end > self->num_blocks || end <= start) {
        PyErr_Format(PyExc_ValueError, "[%zd, %zd) is not a non-empty range inside [0, %zd)", start, end,
                     self->num_blocks);
        return -1;
    }
    return 0;
}

static int check_none_member(FreeRunsObject *self, idx start, idx end) {
    for (idx i = start; i < end; i++)
        if (self->member[i]) {
            PyErr_Format(PyExc_ValueError, "block %zd is already free", i);
            return -1;
        }
    return 0;
}

static int parse_two(PyObject *const *args, Py_ssize_t nargs, const char *name, idx *a, idx *b) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes 2 arguments (%zd given)", name, nargs);
        return -1;
    }
    return get_index(args[0], a) < 0 || get_index(args[1], b) < 0 ? -1 : 0;
}

/* ---- type -------------------------------------------------------------------------------------- */

static void FreeRuns_dealloc(FreeRunsObject *self) {
    Py_XDECREF(self->member_obj);
    PyMem_Free(self->slot);
    PyMem_Free(self->head);
    PyMem_Free(self->tail);
    PyMem_Free(self->count);
    PyMem_Free(self->mask);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int FreeRuns_init(FreeRunsObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"num_blocks", NULL};
    idx n;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "n", keywords, &n)) return -1;
    if (self->member_obj) {
        PyErr_SetString(PyExc_RuntimeError, "FreeRuns is initialised once");
        return -1;
    }
    if (n < 0 || n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "num_blocks must be in [0, 2**31)");
        return -1;
    }
    self->num_blocks = n;
    self->member_obj = PyByteArray_FromStringAndSize(NULL, n);
    if (!self->member_obj) return -1;
    self->member = (uint8_t *)PyByteArray_AS_STRING(self->member_obj);
    memset(self->member, 0, (size_t)n);
    self->num_classes = size_class(n > 1 ? n : 1) + 1;
    self->num_words = (self->num_classes + 63) / 64;
    size_t ids = (size_t)(n > 0 ? n : 1);
    self->slot = PyMem_Calloc(ids, sizeof(RunSlot));
    self->head = PyMem_Malloc(self->num_classes * sizeof(idx));
    self->tail = PyMem_Malloc(self->num_classes * sizeof(idx));
    self->count = PyMem_Calloc(self->num_classes, sizeof(idx));
    self->mask = PyMem_Calloc(self->num_words, sizeof(uint64_t));
    if (!self->slot || !self->head || !self->tail ||
        !self->count || !self->mask) {
        PyErr_NoMemory();
        return -1;
    }
    for (idx c = 0; c < self->num_classes; c++) self->head[c] = self->tail[c] = -1;
    return 0;
}

/* ---- queries ----------------------------------------------------------------------------------- */

static PyObject *FreeRuns_contains(FreeRunsObject *self, PyObject *arg) {
    idx block_id;
    if (get_index(arg, &block_id) < 0) return NULL;
    if (block_id < 0) block_id += self->num_blocks; /* as bytearray indexing */
    if (check_id(self, block_id) < 0) return NULL;
    return PyBool_FromLong(self->member[block_id]);
}

static PyObject *FreeRuns_run_at(FreeRunsObject *self, PyObject *arg) {
    idx start;
    if (get_index(arg, &start) < 0) return NULL;
    if (0 <= start && start < self->num_blocks && self->member[start] && (start == 0 || !self->member[start - 1]))
        return PyLong_FromSsize_t(self->slot[start].end);
    Py_RETURN_NONE;
}

/* Start of the smallest run that holds `num` blocks among a bounded look (see the reference), whose start
 * `accept` (a Python callable, or NULL) accepts and, with `serial` (or NULL), whose first block's serial is
 * below `limit`; -1 if none; -2 with an exception set. */
static idx best_fit(FreeRunsObject *self, idx num, PyObject *accept, const int64_t *serial, int64_t limit) {
    idx examined = 0;
    for (idx cls = next_class(self, size_class(num)); cls >= 0; cls = next_class(self, cls + 1)) {
        idx best = -1, best_len = 0, seen = 0;
        for (idx start = self->head[cls]; start >= 0; start = self->slot[start].next) {
            seen++;
            idx length = self->slot[start].end - start;
            if (length >= num && (best < 0 || length < best_len) && (!serial || serial[start] < limit)) {
                int accepted = 1;
                if (accept) {
                    PyObject *key = PyLong_FromSsize_t(start);
                    if (!key) return -2;
                    PyObject *verdict = PyObject_CallOneArg(accept, key);
                    Py_DECREF(key);
                    if (!verdict) return -2;
                    accepted = PyObject_IsTrue(verdict);
                    Py_DECREF(verdict);
                    if (accepted < 0) return -2;
                }
                if (accepted) {
                    best = start;
                    best_len = length;
                    if (length == num || cls < EXACT_CLASSES) break;
                }
            }
            if (seen == CLASS_SCAN_LIMIT) break;
        }
        examined += seen;
        if (best >= 0) return best;
        if (examined >= FIT_SCAN_LIMIT) break;
    }
    return -1;
}

static PyObject *fit_result(idx start) {
    if (start == -2) return NULL;
    if (start < 0) Py_RETURN_NONE;
    return PyLong_FromSsize_t(start);
}

/* `num` of best_fit and best_fit_older: a block count >= 0. */
static int get_fit_size(PyObject *arg, idx *num) {
    if (get_index(arg, num) < 0) return -1;
    if (*num < 0) {
        PyErr_SetString(PyExc_ValueError, "best_fit of a negative number of blocks");
        return -1;
    }
    return 0;
}

/* Borrow `serial`, an array('q') of at least n LRU stamps indexed by block id, as int64s (give it back with
 * PyBuffer_Release). */
static int get_serial(PyObject *serial, Py_buffer *view, idx n, int writable) {
    if (PyObject_GetBuffer(serial, view, PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) < 0) return -1;
    if (view->itemsize != 8 || view->len < n * 8 || !view->format ||
        (strcmp(view->format, "q") && strcmp(view->format, "l"))) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "serial must be an array('q') of at least %zd entries", n);
        return -1;
    }
    return 0;
}

static PyObject *FreeRuns_best_fit(FreeRunsObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "best_fit(num, accept=None)");
        return NULL;
    }
    idx num;
    if (get_fit_size(args[0], &num) < 0) return NULL;
    return fit_result(best_fit(self, num, nargs == 2 && args[1] != Py_None ? args[1] : NULL, NULL, 0));
}

static PyObject *FreeRuns_best_fit_older(FreeRunsObject *self, PyObject *const *args, Py_ssize_t nargs) {
    idx num, limit;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "best_fit_older(num, serial, limit)");
        return NULL;
    }
    Py_buffer view;
    if (get_fit_size(args[0], &num) < 0 || get_index(args[2], &limit) < 0) return NULL;
    if (get_serial(args[1], &view, self->num_blocks, 0) < 0) return NULL;
    PyObject *result = fit_result(best_fit(self, num, NULL, (const int64_t *)view.buf, limit));
    PyBuffer_Release(&view);
    return result;
}

static PyObject *FreeRuns_largest(FreeRunsObject *self, PyObject *Py_UNUSED(ignored)) {
    idx cls = top_class(self);
    if (cls < 0) Py_RETURN_NONE;
    idx best = -1, best_len = 0;
    for (idx start = self->head[cls]; start >= 0; start = self->slot[start].next) {
        idx length = self->slot[start].end - start;
        if (length > best_len) best = start, best_len = length;
    }
    return Py_BuildValue("(nn)", best, best_len);
}

static int compare_starts(const void *a, const void *b) {
    idx x = *(const idx *)a, y = *(const idx *)b;
    return (x > y) - (x < y);
}

static PyObject *FreeRuns_runs(FreeRunsObject *self, PyObject *Py_UNUSED(ignored)) {
    idx *starts = PyMem_Malloc((size_t)(self->num_runs > 0 ? self->num_runs : 1) * sizeof(idx));
    if (!starts) return PyErr_NoMemory();
    idx found = 0;
    for (idx cls = 0; cls < self->num_classes; cls++)
        for (idx start = self->head[cls]; start >= 0 && found < self->num_runs; start = self->slot[start].next)
            starts[found++] = start;
    qsort(starts, (size_t)found, sizeof(idx), compare_starts);
    PyObject *out = PyList_New(found);
    for (idx i = 0; out && i < found; i++) {
        PyObject *run = Py_BuildValue("(nn)", starts[i], self->slot[starts[i]].end);
        if (!run) Py_CLEAR(out); else PyList_SET_ITEM(out, i, run);
    }
    PyMem_Free(starts);
    return out;
}

static PyObject *FreeRuns_run_containing(FreeRunsObject *self, PyObject *arg) {
    idx block_id;
    if (get_index(arg, &block_id) < 0 || check_id(self, block_id) < 0) return NULL;
    if (!self->member[block_id]) return PyErr_Format(PyExc_ValueError, "block %zd is not free", block_id);
    return PyLong_FromSsize_t(run_start_of(self, block_id));
}

/* ---- updates ----------------------------------------------------------------------------------- */

static PyObject *FreeRuns_add(FreeRunsObject *self, PyObject *arg) {
    idx block_id;
    if (get_index(arg, &block_id) < 0 || check_id(self, block_id) < 0) return NULL;
    if (check_none_member(self, block_id, block_id + 1) < 0) return NULL;
    add_run_unchecked(self, block_id, block_id + 1);
    Py_RETURN_NONE;
}

static PyObject *FreeRuns_add_range(FreeRunsObject *self, PyObject *const *args, Py_ssize_t nargs) {
    idx start, end;
    if (parse_two(args, nargs, "add_range", &start, &end) < 0 || check_span(self, start, end) < 0) return NULL;
    idx lo = start > 0 ? start - 1 : 0, hi = end < self->num_blocks ? end + 1 : end;
    if (check_none_member(self, lo, hi) < 0) return NULL; /* nor its neighbours: no merge */
    memset(self->member + start, 1, (size_t)(end - start));
    file_in(self, start, end);
    self->num_free += end - start;
    self->num_runs += 1;
    Py_RETURN_NONE;
}

static PyObject *FreeRuns_add_run(FreeRunsObject *self, PyObject *const *args, Py_ssize_t nargs) {
    idx start, end;
    if (parse_two(args, nargs, "add_run", &start, &end) < 0 || check_span(self, start, end) < 0) return NULL;
    if (check_none_member(self, start, end) < 0) return NULL;
    add_run_unchecked(self, start, end);
    Py_RETURN_NONE;
}

/* Sort ids[0:n] (ascending) and add them to `runs`, one merge per consecutive stretch; none may be a member
 * or listed twice (checked before anything changes). */
static int add_ids(FreeRunsObject *runs, idx *ids, idx n) {
    qsort(ids, (size_t)n, sizeof(idx), compare_starts);
    for (idx i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= runs->num_blocks || runs->member[ids[i]] || (i && ids[i] == ids[i - 1])) {
            PyErr_Format(PyExc_ValueError, "block %zd cannot join the free runs", ids[i]);
            return -1;
        }
    for (idx i = 0; i < n;) {
        idx j = i + 1;
        while (j < n && ids[j] == ids[j - 1] + 1) j++;
        add_run_unchecked(runs, ids[i], ids[j - 1] + 1);
        i = j;
    }
    return 0;
}

static PyObject *FreeRuns_add_many(FreeRunsObject *self, PyObject *arg) {
    if (!PyList_Check(arg)) return PyErr_Format(PyExc_TypeError, "add_many takes a list of block ids");
    if (PyList_Sort(arg) < 0) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(arg);
    idx stack_ids[256];
    idx *ids = n <= 256 ? stack_ids : PyMem_Malloc((size_t)(n > 0 ? n : 1) * sizeof(idx));
    if (!ids) return PyErr_NoMemory();
    PyObject *result = NULL;
    Py_ssize_t i = 0;
    while (i < n && get_index(PyList_GET_ITEM(arg, i), &ids[i]) == 0) i++;
    if (i == n && add_ids(self, ids, n) == 0) result = Py_NewRef(Py_None);
    if (ids != stack_ids) PyMem_Free(ids);
    return result;
}

static PyObject *FreeRuns_take_prefix(FreeRunsObject *self, PyObject *const *args, Py_ssize_t nargs) {
    idx start, num;
    if (parse_two(args, nargs, "take_prefix", &start, &num) < 0 || check_id(self, start) < 0) return NULL;
    if (!self->member[start] || (start > 0 && self->member[start - 1]))
        return PyErr_Format(PyExc_ValueError, "no run starts at %zd", start);
    idx end = self->slot[start].end;
    if (num <= 0 || num > end - start)
        return PyErr_Format(PyExc_ValueError, "cannot take %zd blocks of a run of %zd", num, end - start);
    file_out(self, start, end);
    if (start + num < end) file_in(self, start + num, end); else self->num_runs -= 1;
    memset(self->member + start, 0, (size_t)num);
    self->num_free -= num;
    Py_RETURN_NONE;
}

/* Remove [start, end), which lies inside the run that starts at run_start. */
static void cut(FreeRunsObject *self, idx run_start, idx start, idx end) {
    idx run_end = self->slot[run_start].end;
    file_out(self, run_start, run_end);
    if (run_start < start) file_in(self, run_start, start);
    if (end < run_end) file_in(self, end, run_end);
    memset(self->member + start, 0, (size_t)(end - start));
    self->num_free -= end - start;
    self->num_runs += (run_start < start) + (end < run_end) - 1;
}

static PyObject *FreeRuns_remove_range(FreeRunsObject *self, PyObject *const *args, Py_ssize_t nargs) {
    idx start, end;
    if (parse_two(args, nargs, "remove_range", &start, &end) < 0 || check_span(self, start, end) < 0) return NULL;
    if (!self->member[start]) return PyErr_Format(PyExc_ValueError, "block %zd is not free", start);
    idx run_start = run_start_of(self, start);
    if (end > self->slot[run_start].end)
        return PyErr_Format(PyExc_ValueError, "[%zd, %zd) is not inside one run", start, end);
    cut(self, run_start, start, end);
    Py_RETURN_NONE;
}

static PyObject *FreeRuns_remove(FreeRunsObject *self, PyObject *arg) {
    idx block_id;
    if (get_index(arg, &block_id) < 0 || check_id(self, block_id) < 0) return NULL;
    if (!self->member[block_id]) return PyErr_Format(PyExc_ValueError, "block %zd is not free", block_id);
    cut(self, run_start_of(self, block_id), block_id, block_id + 1);
    Py_RETURN_NONE;
}

/* ---- the pool's free pass ---------------------------------------------------------------------- */

/* Fields of vLLM's KVCacheBlock (a dataclass with slots): read in place and written through their member
 * descriptors, resolved once per block type; a block of another type goes through getattr. */
typedef struct {
    PyTypeObject *type;
    PyMemberDef *ref_cnt, *block_hash, *block_id, *is_null;
} BlockFields;

static BlockFields fields;
static PyObject *name_ref_cnt, *name_block_hash, *name_block_id, *name_is_null;

static PyMemberDef *member_of(PyTypeObject *type, PyObject *name) {
    PyObject *descr = _PyType_Lookup(type, name); /* borrowed */
    if (descr && Py_IS_TYPE(descr, &PyMemberDescr_Type)) return ((PyMemberDescrObject *)descr)->d_member;
    return NULL;
}

static void resolve_fields(PyTypeObject *type) {
    fields.type = NULL;
    fields.ref_cnt = member_of(type, name_ref_cnt);
    fields.block_hash = member_of(type, name_block_hash);
    fields.block_id = member_of(type, name_block_id);
    fields.is_null = member_of(type, name_is_null);
    if (fields.ref_cnt && fields.block_hash && fields.block_id && fields.is_null) fields.type = type;
}

/* The field's object. A slot of the resolved type is read in place, without taking a reference (*held
 * NULL): taking one is a store into the object, and for a block's hash object, which nothing else here
 * touches, that is one cache miss per cached block. Any other field goes through getattr (*held: the new
 * reference, for the caller to release when done with the value). NULL: an error is set. */
static PyObject *read_field(PyObject *block, PyMemberDef *member, PyObject *name, PyObject **held) {
    *held = NULL;
    if (Py_TYPE(block) == fields.type && member->type == T_OBJECT_EX) {
        PyObject *value = *(PyObject **)((char *)block + member->offset);
        if (!value) PyErr_SetObject(PyExc_AttributeError, name);
        return value;
    }
    return *held = PyObject_GetAttr(block, name);
}

/* 1 if the field is None, 0 if not, -1 on error. */
static int field_is_none(PyObject *block, PyMemberDef *member, PyObject *name) {
    PyObject *held, *value = read_field(block, member, name, &held);
    int none = value ? value == Py_None : -1;
    Py_XDECREF(held);
    return none;
}

/* The field's truth value, -1 on error. */
static int field_truth(PyObject *block, PyMemberDef *member, PyObject *name) {
    PyObject *held, *value = read_field(block, member, name, &held);
    int truth = value ? PyObject_IsTrue(value) : -1;
    Py_XDECREF(held);
    return truth;
}

/* The field's value as an index, -1 with an error set on failure. */
static idx field_index(PyObject *block, PyMemberDef *member, PyObject *name) {
    PyObject *held, *value = read_field(block, member, name, &held);
    idx index = value ? PyLong_AsSsize_t(value) : -1;
    Py_XDECREF(held);
    return index;
}

static int set_field(PyObject *block, PyMemberDef *member, PyObject *name, PyObject *value) {
    if (Py_TYPE(block) == fields.type) return PyMember_SetOne((char *)block, member, value);
    return PyObject_SetAttr(block, name, value);
}

typedef struct {
    idx *data;
    idx size, capacity;
} IdList;

static int push_id(IdList *list, idx value) {
    if (list->size == list->capacity) {
        idx capacity = list->capacity * 2;
        idx *data = PyMem_Realloc(list->data, (size_t)capacity * sizeof(idx));
        if (!data) {
            PyErr_NoMemory();
            return -1;
        }
        list->data = data;
        list->capacity = capacity;
    }
    list->data[list->size++] = value;
    return 0;
}

static int check_list_size(PyObject *list, idx size, const char *name) {
    if (!PyList_Check(list) || PyList_GET_SIZE(list) < size) {
        PyErr_Format(PyExc_TypeError, "%s must be a list of at least %zd ints", name, size);
        return -1;
    }
    return 0;
}

/* release_blocks(ordered_blocks, free_mask, in_lru, serial, hits, clock, runs, cold)
 *     -> (number of blocks that became free, their cached blocks in order, the new clock)
 * BestFitBlockPool.free_blocks' pass with caching on, as the reference there does it: each block's
 * ref_cnt drops by one; each that reaches 0 (the null block aside) becomes free: `free_mask` 1; without a
 * hash it joins `runs`; with one it is stamped `serial[id] = clock++`, marked `in_lru`, and joins `cold`
 * if it was never hit (`hits[id] == 0`). The caller adds the count to the free count and appends the
 * cached blocks to the LRU queue. */
static PyObject *release_blocks(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) return PyErr_Format(PyExc_TypeError, "release_blocks takes 8 arguments (%zd given)", nargs);
    PyObject *blocks = args[0], *free_mask = args[1], *in_lru = args[2], *serial = args[3], *hits = args[4];
    idx clock;
    if (get_index(args[5], &clock) < 0) return NULL;
    if (!PyObject_TypeCheck(args[6], &FreeRunsType) || !PyObject_TypeCheck(args[7], &FreeRunsType))
        return PyErr_Format(PyExc_TypeError, "runs and cold must be compiled FreeRuns");
    FreeRunsObject *runs = (FreeRunsObject *)args[6], *cold = (FreeRunsObject *)args[7];
    idx n = runs->num_blocks;
    if (cold->num_blocks != n || !PyByteArray_Check(free_mask) || PyByteArray_GET_SIZE(free_mask) < n ||
        !PyByteArray_Check(in_lru) || PyByteArray_GET_SIZE(in_lru) < n)
        return PyErr_Format(PyExc_TypeError, "free_mask and in_lru must be bytearrays of the pool's size");
    if (check_list_size(hits, n, "hits") < 0) return NULL;
    Py_buffer stamps;
    if (get_serial(serial, &stamps, n, 1) < 0) return NULL;
    int64_t *serial_at = (int64_t *)stamps.buf;
    uint8_t *free_bytes = (uint8_t *)PyByteArray_AS_STRING(free_mask);
    uint8_t *lru_bytes = (uint8_t *)PyByteArray_AS_STRING(in_lru);

    PyObject *iterator = PyObject_GetIter(blocks), *cached = PyList_New(0), *result = NULL, *block;
    idx empty_store[128], never_hit_store[128];
    IdList empty = {empty_store, 0, 128}, never_hit = {never_hit_store, 0, 128};
    idx freed = 0;
    if (!iterator || !cached) goto done;
    while ((block = PyIter_Next(iterator))) {
        if (Py_TYPE(block) != fields.type) resolve_fields(Py_TYPE(block));
        idx count = field_index(block, fields.ref_cnt, name_ref_cnt);
        PyObject *lowered = count == -1 && PyErr_Occurred() ? NULL : PyLong_FromSsize_t(count - 1);
        if (!lowered || set_field(block, fields.ref_cnt, name_ref_cnt, lowered) < 0) {
            Py_XDECREF(lowered);
            Py_DECREF(block);
            goto done;
        }
        Py_DECREF(lowered);
        int ok = 1;
        if (count == 1) {
            int null = field_truth(block, fields.is_null, name_is_null);
            int no_hash = null == 0 ? field_is_none(block, fields.block_hash, name_block_hash) : -1;
            idx block_id = no_hash >= 0 ? field_index(block, fields.block_id, name_block_id) : -1;
            if (null < 0 || (null == 0 && (no_hash < 0 || (block_id == -1 && PyErr_Occurred())))) {
                ok = 0;
            } else if (null == 0) {
                if (block_id < 0 || block_id >= n) {
                    PyErr_Format(PyExc_ValueError, "block id %zd out of range [0, %zd)", block_id, n);
                    ok = 0;
                } else if (free_bytes[block_id]) {
                    PyErr_Format(PyExc_ValueError, "block %zd is freed twice", block_id);
                    ok = 0;
                } else {
                    free_bytes[block_id] = 1;
                    freed++;
                    if (no_hash) {
                        ok = push_id(&empty, block_id) == 0;
                    } else {
                        ok = PyList_Append(cached, block) == 0;
                        serial_at[block_id] = clock++;
                        lru_bytes[block_id] = 1;
                        PyObject *used = PyList_GET_ITEM(hits, block_id);
                        if (ok && PyLong_Check(used) && PyLong_AsLong(used) == 0)
                            ok = push_id(&never_hit, block_id) == 0;
                    }
                }
            }
        }
        Py_DECREF(block);
        if (!ok) goto done;
    }
    if (PyErr_Occurred()) goto done;
    if (add_ids(runs, empty.data, empty.size) < 0 || add_ids(cold, never_hit.data, never_hit.size) < 0) goto done;
    result = Py_BuildValue("(nOn)", freed, cached, clock);
done:
    if (empty.data != empty_store) PyMem_Free(empty.data);
    if (never_hit.data != never_hit_store) PyMem_Free(never_hit.data);
    Py_XDECREF(iterator);
    Py_XDECREF(cached);
    PyBuffer_Release(&stamps);
    return result;
}

/* ---- module ------------------------------------------------------------------------------------ */

static PyMethodDef FreeRuns_methods[] = {
    {"contains", (PyCFunction)FreeRuns_contains, METH_O, "Whether block_id is a member."},
    {"run_at", (PyCFunction)FreeRuns_run_at, METH_O, "End (exclusive) of the run that starts at start, or None."},
    {"best_fit", (PyCFunction)(void (*)(void))FreeRuns_best_fit, METH_FASTCALL,
     "Start of the smallest run that holds num blocks (exact below 64), bounded look; accept filters starts."},
    {"best_fit_older", (PyCFunction)(void (*)(void))FreeRuns_best_fit_older, METH_FASTCALL,
     "best_fit(num, accept=lambda start: serial[start] < limit), without calling back into Python."},
    {"largest", (PyCFunction)FreeRuns_largest, METH_NOARGS, "(start, length) of a longest run, or None."},
    {"runs", (PyCFunction)FreeRuns_runs, METH_NOARGS, "All runs as (start, end), ascending."},
    {"run_containing", (PyCFunction)FreeRuns_run_containing, METH_O, "Start of the run holding member block_id."},
    {"add", (PyCFunction)FreeRuns_add, METH_O, "Add a non-member, merging with neighbouring runs."},
    {"add_range", (PyCFunction)(void (*)(void))FreeRuns_add_range, METH_FASTCALL,
     "Add [start, end); none of its ids nor its two neighbours may be members."},
    {"add_run", (PyCFunction)(void (*)(void))FreeRuns_add_run, METH_FASTCALL,
     "Add [start, end) of non-members, merging with neighbouring runs."},
    {"add_many", (PyCFunction)FreeRuns_add_many, METH_O,
     "Add distinct non-members (a list, sorted in place), one merge per consecutive stretch."},
    {"take_prefix", (PyCFunction)(void (*)(void))FreeRuns_take_prefix, METH_FASTCALL,
     "Remove the first num blocks of the run that starts at start."},
    {"remove_range", (PyCFunction)(void (*)(void))FreeRuns_remove_range, METH_FASTCALL,
     "Remove [start, end), which must lie inside one run."},
    {"remove", (PyCFunction)FreeRuns_remove, METH_O, "Remove any member."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef FreeRuns_members[] = {
    {"num_blocks", T_PYSSIZET, offsetof(FreeRunsObject, num_blocks), READONLY, "Ids are in [0, num_blocks)."},
    {"num_free", T_PYSSIZET, offsetof(FreeRunsObject, num_free), READONLY, "Number of member ids."},
    {"num_runs", T_PYSSIZET, offsetof(FreeRunsObject, num_runs), READONLY, "Number of maximal runs."},
    {"_member", T_OBJECT, offsetof(FreeRunsObject, member_obj), READONLY, "bytearray: 1 per member id."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject FreeRunsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tinyserve.engine._free_runs.FreeRuns",
    .tp_doc = "The set of free block ids in [0, num_blocks), kept as maximal runs (compiled; see free_runs.py).",
    .tp_basicsize = sizeof(FreeRunsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FreeRuns_init,
    .tp_dealloc = (destructor)FreeRuns_dealloc,
    .tp_methods = FreeRuns_methods,
    .tp_members = FreeRuns_members,
};

static PyObject *module_size_class(PyObject *Py_UNUSED(module), PyObject *arg) {
    idx length;
    if (get_index(arg, &length) < 0) return NULL;
    if (length < 1) return PyErr_Format(PyExc_ValueError, "size_class of a run of %zd blocks", length);
    return PyLong_FromSsize_t(size_class(length));
}

static PyMethodDef module_methods[] = {
    {"size_class", module_size_class, METH_O, "Size class of a run of length >= 1 blocks."},
    {"release_blocks", (PyCFunction)(void (*)(void))release_blocks, METH_FASTCALL,
     "BestFitBlockPool.free_blocks' pass with caching on (see _free_runs.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef free_runs_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_free_runs",
    .m_doc = "Compiled FreeRuns and the block pool's free pass (see tinyserve/engine/_free_runs.c).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__free_runs(void) {
    if (PyType_Ready(&FreeRunsType) < 0) return NULL;
    name_ref_cnt = PyUnicode_InternFromString("ref_cnt");
    name_block_hash = PyUnicode_InternFromString("_block_hash");
    name_block_id = PyUnicode_InternFromString("block_id");
    name_is_null = PyUnicode_InternFromString("is_null");
    if (!name_ref_cnt || !name_block_hash || !name_block_id || !name_is_null) return NULL;
    PyObject *module = PyModule_Create(&free_runs_module);
    if (!module) return NULL;
    if (PyModule_AddObjectRef(module, "FreeRuns", (PyObject *)&FreeRunsType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
