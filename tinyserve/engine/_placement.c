/* Compiled per-request placement record, and decode growth inside a request's reservation.
 *
 * Placement has the fields of placement.ReferencePlacement (which documents them), with its integers
 * stored in the object: decode growth reads four of them on every allocation, and in the reference each
 * is an int object of its own, one more cache miss per field among thousands of interleaved requests.
 *
 * ReservationGrowth is the hottest step of BestFitBlockPool.get_new_blocks (block_pool.py has the Python
 * it mirrors): a request taking the next block of its own reservation. It issues the loads that step needs
 * (both masks, the block object, the list's slot of the block after it) before using any of them, so that
 * their misses overlap instead of following one another, and it remembers that next block in the
 * placement, so the request's next step starts from the block object instead of the list. It declines
 * (returns None, changing nothing) whenever the step is not that one, or the block would end the
 * reservation: the Python path handles those.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>

/* ---- Placement ---------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    long long tail, held, res_next, res_end;
    PyObject *pool, *request, *scan;
    /* Set by ReservationGrowth only: the block object of id `next_id` in the block list `next_list` (compared,
     * never dereferenced), so that the next growth step does not wait on the list's slot before it can load
     * the block. NULL: none. */
    PyObject *next_block;
    PyObject *next_list;
    long long next_id;
} PlacementObject;

static int Placement_init(PlacementObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"pool", "request", NULL};
    PyObject *pool, *request;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO", keywords, &pool, &request)) return -1;
    Py_INCREF(pool);
    Py_XSETREF(self->pool, pool);
    Py_INCREF(request);
    Py_XSETREF(self->request, request);
    Py_INCREF(Py_None);
    Py_XSETREF(self->scan, Py_None);
    Py_CLEAR(self->next_block);
    self->tail = -2;
    self->held = self->res_next = self->res_end = 0;
    return 0;
}

static int Placement_traverse(PlacementObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->pool);
    Py_VISIT(self->request);
    Py_VISIT(self->scan);
    Py_VISIT(self->next_block);
    return 0;
}

static int Placement_clear(PlacementObject *self) {
    Py_CLEAR(self->pool);
    Py_CLEAR(self->request);
    Py_CLEAR(self->scan);
    Py_CLEAR(self->next_block);
    return 0;
}

static void Placement_dealloc(PlacementObject *self) {
    PyObject_GC_UnTrack(self);
    Placement_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef Placement_members[] = {
    {"pool", T_OBJECT, offsetof(PlacementObject, pool), 0, "The pool (None once it forgot the request)."},
    {"request", T_OBJECT, offsetof(PlacementObject, request), 0, "vLLM's Request (None once forgotten)."},
    {"scan", T_OBJECT, offsetof(PlacementObject, scan), 0, "own_runs.TableScan of its table, or None."},
    {"tail", T_LONGLONG, offsetof(PlacementObject, tail), 0, "Id of its table's last block (-2: none yet)."},
    {"held", T_LONGLONG, offsetof(PlacementObject, held), 0, "How many blocks its table holds."},
    {"res_next", T_LONGLONG, offsetof(PlacementObject, res_next), 0, "Next block of its reservation."},
    {"res_end", T_LONGLONG, offsetof(PlacementObject, res_end), 0, "Its reservation's end (0: none)."},
    {NULL},
};

static PyTypeObject PlacementType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tinyserve.engine._placement.Placement",
    .tp_doc = PyDoc_STR("Placement state of one request in one pool (see placement.ReferencePlacement)."),
    .tp_basicsize = sizeof(PlacementObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Placement_init,
    .tp_traverse = (traverseproc)Placement_traverse,
    .tp_clear = (inquiry)Placement_clear,
    .tp_dealloc = (destructor)Placement_dealloc,
    .tp_members = Placement_members,
};

/* ---- ReservationGrowth -------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *blocks, *free_mask, *reserved_mask; /* the pool's: list of KVCacheBlock, two bytearrays */
    PyTypeObject *block_type;                     /* the block type whose ref_cnt slot is resolved */
    Py_ssize_t ref_cnt_offset;
} ReservationGrowthObject;

static PyObject *name_ref_cnt;
static PyObject *ReservationGrowth_call(ReservationGrowthObject *self, PyObject *const *args, size_t nargsf,
                                        PyObject *kwnames);

static int ReservationGrowth_init(ReservationGrowthObject *self, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"blocks", "free_mask", "reserved_mask", NULL};
    PyObject *blocks, *free_mask, *reserved_mask;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!O!", keywords, &PyList_Type, &blocks, &PyByteArray_Type,
                                     &free_mask, &PyByteArray_Type, &reserved_mask))
        return -1;
    Py_ssize_t n = PyList_GET_SIZE(blocks);
    if (PyByteArray_GET_SIZE(free_mask) != n || PyByteArray_GET_SIZE(reserved_mask) != n) {
        PyErr_SetString(PyExc_ValueError, "free_mask and reserved_mask must have one byte per block");
        return -1;
    }
    Py_INCREF(blocks);
    Py_XSETREF(self->blocks, blocks);
    Py_INCREF(free_mask);
    Py_XSETREF(self->free_mask, free_mask);
    Py_INCREF(reserved_mask);
    Py_XSETREF(self->reserved_mask, reserved_mask);
    self->block_type = NULL;
    self->vectorcall = (vectorcallfunc)ReservationGrowth_call;
    return 0;
}

static int ReservationGrowth_traverse(ReservationGrowthObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->blocks);
    Py_VISIT(self->free_mask);
    Py_VISIT(self->reserved_mask);
    return 0;
}

static int ReservationGrowth_clear(ReservationGrowthObject *self) {
    Py_CLEAR(self->blocks);
    Py_CLEAR(self->free_mask);
    Py_CLEAR(self->reserved_mask);
    return 0;
}

static void ReservationGrowth_dealloc(ReservationGrowthObject *self) {
    PyObject_GC_UnTrack(self);
    ReservationGrowth_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The offset of `ref_cnt` in blocks of `type` when it is an object slot (vLLM's KVCacheBlock is a
 * dataclass with slots), else -1: blocks of such a type make the step decline. */
static Py_ssize_t ref_cnt_offset_of(PyTypeObject *type) {
    PyObject *descr = _PyType_Lookup(type, name_ref_cnt); /* borrowed */
    if (!descr || !Py_IS_TYPE(descr, &PyMemberDescr_Type)) return -1;
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
    return member->type == T_OBJECT_EX && !(member->flags & READONLY) ? member->offset : -1;
}

/* growth(placement) -> [block] or None.  With placement.tail + 1 == placement.res_next (a reservation
 * that does not end after it), the block res_next: off both masks, its ref_cnt 1 (it was 0), placement's
 * tail, held and res_next advanced. The caller lowers the pool's free count. */
static PyObject *ReservationGrowth_call(ReservationGrowthObject *self, PyObject *const *args, size_t nargsf,
                                        PyObject *kwnames) {
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames) {
        PyErr_SetString(PyExc_TypeError, "ReservationGrowth takes one positional argument");
        return NULL;
    }
    PyObject *arg = args[0];
    if (!Py_IS_TYPE(arg, &PlacementType)) Py_RETURN_NONE;
    PlacementObject *placement = (PlacementObject *)arg;
    long long block_id = placement->tail + 1;
    Py_ssize_t n = PyList_GET_SIZE(self->blocks);
    if (!placement->res_end || placement->res_next != block_id || block_id + 1 >= placement->res_end ||
        block_id < 1 || placement->res_end > n || placement->res_end > PyByteArray_GET_SIZE(self->free_mask) ||
        placement->res_end > PyByteArray_GET_SIZE(self->reserved_mask))
        Py_RETURN_NONE; /* not this step, or a mask shorter than the reservation */
    uint8_t *free_at = (uint8_t *)PyByteArray_AS_STRING(self->free_mask) + block_id;
    uint8_t *reserved_at = (uint8_t *)PyByteArray_AS_STRING(self->reserved_mask) + block_id;
    __builtin_prefetch(free_at, 1);
    __builtin_prefetch(reserved_at, 1);
    /* The step after this one is also this step iff block_id + 2 < res_end: its block's slot is loaded now,
     * beside this block's, instead of first thing then. */
    PyObject **next_slot = block_id + 2 < placement->res_end ? &PyList_GET_ITEM(self->blocks, block_id + 1) : NULL;
    if (next_slot) __builtin_prefetch(next_slot, 0);
    PyObject *block = placement->next_block && placement->next_id == block_id && placement->next_list == self->blocks
                          ? placement->next_block
                          : PyList_GET_ITEM(self->blocks, block_id);
    PyTypeObject *type = Py_TYPE(block);
    if (type != self->block_type) {
        self->ref_cnt_offset = ref_cnt_offset_of(type);
        self->block_type = type;
    }
    if (self->ref_cnt_offset < 0) Py_RETURN_NONE;
    PyObject **ref_cnt = (PyObject **)((char *)block + self->ref_cnt_offset);
    __builtin_prefetch(ref_cnt, 1);
    if (!*free_at || !*reserved_at) {
        PyErr_Format(PyExc_ValueError, "reserved block %lld is not free and reserved", block_id);
        return NULL;
    }
    PyObject *zero = *ref_cnt;
    if (!zero || !PyLong_CheckExact(zero) || PyLong_AsLong(zero) != 0) {
        PyErr_Format(PyExc_ValueError, "reserved block %lld has a reference count", block_id);
        return NULL;
    }
    PyObject *result = PyList_New(1);
    if (!result) return NULL;
    *free_at = 0;
    *reserved_at = 0;
    placement->res_next = block_id + 1;
    placement->tail = block_id;
    placement->held += 1;
    Py_XSETREF(*ref_cnt, PyLong_FromLong(1)); /* a small int: no allocation, cannot fail */
    Py_INCREF(block);
    PyList_SET_ITEM(result, 0, block);
    if (next_slot) {
        PyObject *next = *next_slot;
        Py_INCREF(next);
        Py_XSETREF(placement->next_block, next);
        placement->next_list = self->blocks;
        placement->next_id = block_id + 1;
    } else {
        Py_CLEAR(placement->next_block);
    }
    return result;
}

static PyTypeObject ReservationGrowthType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tinyserve.engine._placement.ReservationGrowth",
    .tp_doc = PyDoc_STR("ReservationGrowth(blocks, free_mask, reserved_mask): decode growth inside a request's "
                        "reservation (see _placement.c)."),
    .tp_basicsize = sizeof(ReservationGrowthObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(ReservationGrowthObject, vectorcall),
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ReservationGrowth_init,
    .tp_traverse = (traverseproc)ReservationGrowth_traverse,
    .tp_clear = (inquiry)ReservationGrowth_clear,
    .tp_dealloc = (destructor)ReservationGrowth_dealloc,
    .tp_call = PyVectorcall_Call,
};

/* ---- module ------------------------------------------------------------------------------------ */

static struct PyModuleDef placement_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_placement",
    .m_doc = "Compiled placement record and decode growth in a reservation (see tinyserve/engine/_placement.c).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__placement(void) {
    if (PyType_Ready(&PlacementType) < 0 || PyType_Ready(&ReservationGrowthType) < 0) return NULL;
    name_ref_cnt = PyUnicode_InternFromString("ref_cnt");
    if (!name_ref_cnt) return NULL;
    PyObject *module = PyModule_Create(&placement_module);
    if (!module) return NULL;
    if (PyModule_AddObjectRef(module, "Placement", (PyObject *)&PlacementType) < 0 ||
        PyModule_AddObjectRef(module, "ReservationGrowth", (PyObject *)&ReservationGrowthType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
