"""The part of torch's API that test_cuda.py uses, over device memory of kvsieve's CUDA
emulator (scripts/cuda-emu.sh), so the Python CUDA tests run without a GPU.

Device arrays are allocated through the stand-in ``libcuda.so`` (whose device memory is
host memory) and handed to kvsieve through ``__dlpack__`` as ``kDLCUDA`` tensors. Used by
test_cuda.py only when ``KVSIEVE_CUDA_EMU=1`` (set by scripts/cuda-emu.sh)."""

import builtins
import ctypes

import numpy as np

_cuda = ctypes.CDLL("libcuda.so")
_cuda.cuMemAlloc_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t]
_cuda.cuMemFree_v2.argtypes = [ctypes.c_uint64]

float16, float32, int32, int64 = np.float16, np.float32, np.int32, np.int64
float, int = np.float32, np.int32  # noqa: A001 (torch's names)

_KDL_CUDA = 2
_CODES = {"f": 2, "i": 0, "u": 1}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype = ctypes.py_object
_new_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class device:
    def __init__(self, kind):
        assert kind == "cuda", kind


class Tensor:
    """A contiguous array in emulated device memory."""

    def __init__(self, shape, dtype):
        self.shape = (shape,) if isinstance(shape, builtins.int) else tuple(shape)
        self.ptr = 0
        self.dtype = np.dtype(dtype)
        self.nbytes = max(1, builtins.int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize)
        ptr = ctypes.c_uint64()
        assert _cuda.cuMemAlloc_v2(ctypes.byref(ptr), self.nbytes) == 0
        self.ptr = ptr.value
        self._keep = []

    def __del__(self):
        if self.ptr:
            _cuda.cuMemFree_v2(self.ptr)

    def _view(self):
        buf = (ctypes.c_char * self.nbytes).from_address(self.ptr)
        return np.frombuffer(buf, dtype=self.dtype, count=builtins.int(np.prod(self.shape, dtype=np.int64))).reshape(self.shape)

    def copy_from(self, a):
        self._view()[...] = np.asarray(a, self.dtype).reshape(self.shape)
        return self

    def fill_(self, v):
        self._view()[...] = v
        return self

    def cpu(self):
        return _Host(self._view().copy())

    def float(self):
        return Tensor(self.shape, np.float32).copy_from(self._view().astype(np.float32))

    def __dlpack_device__(self):
        return (_KDL_CUDA, 0)

    def __dlpack__(self, stream=None, **_):
        shape = (ctypes.c_int64 * len(self.shape))(*self.shape)
        m = _DLManagedTensor()
        m.dl_tensor.data = self.ptr
        m.dl_tensor.device = _DLDevice(_KDL_CUDA, 0)
        m.dl_tensor.ndim = len(self.shape)
        m.dl_tensor.dtype = _DLDataType(_CODES[self.dtype.kind], self.dtype.itemsize * 8, 1)
        m.dl_tensor.shape = shape
        m.dl_tensor.strides = None  # compact row-major
        m.dl_tensor.byte_offset = 0
        self._keep.append((shape, m))  # lives as long as the array
        return _new_capsule(ctypes.addressof(m), b"dltensor", None)


class _Host:
    def __init__(self, a):
        self._a = a

    def numpy(self):
        return self._a

    def to(self, _device):
        return Tensor(self._a.shape, self._a.dtype).copy_from(self._a)


def from_numpy(a):
    return _Host(np.ascontiguousarray(a))


def zeros(shape, dtype=np.float32, device=None):
    return Tensor(shape, dtype).fill_(0)


def zeros_like(t):
    return Tensor(t.shape, t.dtype).fill_(0)


def full(shape, value, dtype=np.float32, device=None):
    return Tensor(shape, dtype).fill_(value)


class cuda:
    @staticmethod
    def is_available():
        return True

    @staticmethod
    def synchronize():
        pass
