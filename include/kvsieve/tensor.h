/**
 * \file kvsieve/tensor.h
 *
 * \brief Tensors: borrowed tensor descriptors laid out like DLPack's `DLTensor`, with their
 * devices (CPU, CUDA) and element types (float32, float16, bfloat16).
 * kvsieve.h includes this header; the conventions stated there apply to it.
 */

#ifndef KVSIEVE_TENSOR_H
#define KVSIEVE_TENSOR_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** \brief DLPack device types kvsieve knows (`DLDeviceType`). */
typedef enum kvsieve_device_type {
    /** Host memory (`kDLCPU`), what every function but the `kvsieve_cuda_*` ones takes. */
    KVSIEVE_DEVICE_CPU = 1,
    /** CUDA device memory (`kDLCUDA`): taken by the `kvsieve_cuda_*` functions only; the host
     *  functions refuse it with #KVSIEVE_ERROR_UNSUPPORTED. */
    KVSIEVE_DEVICE_CUDA = 2,
    /** CUDA managed memory (`kDLCUDAManaged`): accepted wherever #KVSIEVE_DEVICE_CUDA is. */
    KVSIEVE_DEVICE_CUDA_MANAGED = 13
} kvsieve_device_type_t;

/** \brief DLPack type codes kvsieve accepts (`DLDataTypeCode`). */
typedef enum kvsieve_dtype_code {
    /** IEEE floating point (`kDLFloat`): bits 32 (float32) or 16 (float16). */
    KVSIEVE_DTYPE_CODE_FLOAT = 2,
    /** bfloat16 (`kDLBfloat`): bits 16. */
    KVSIEVE_DTYPE_CODE_BFLOAT = 4
} kvsieve_dtype_code_t;

/**
 * \brief A device, laid out like DLPack's `DLDevice`.
 *
 * `device_type` takes a ::kvsieve_device_type_t value; `device_id` is 0 for the CPU.
 */
typedef struct kvsieve_device {
    int32_t device_type;
    int32_t device_id;
} kvsieve_device_t;

/**
 * \brief An element type, laid out like DLPack's `DLDataType`.
 *
 * Accepted: float32 `{KVSIEVE_DTYPE_CODE_FLOAT, 32, 1}`, float16
 * `{KVSIEVE_DTYPE_CODE_FLOAT, 16, 1}` and bfloat16 `{KVSIEVE_DTYPE_CODE_BFLOAT, 16, 1}`;
 * anything else gives #KVSIEVE_ERROR_DTYPE. Initialisers: #KVSIEVE_DTYPE_F32,
 * #KVSIEVE_DTYPE_F16, #KVSIEVE_DTYPE_BF16.
 */
typedef struct kvsieve_dtype {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} kvsieve_dtype_t;

/** \brief Initialiser of a float32 ::kvsieve_dtype_t. */
#define KVSIEVE_DTYPE_F32 {KVSIEVE_DTYPE_CODE_FLOAT, 32, 1}
/** \brief Initialiser of a float16 ::kvsieve_dtype_t. */
#define KVSIEVE_DTYPE_F16 {KVSIEVE_DTYPE_CODE_FLOAT, 16, 1}
/** \brief Initialiser of a bfloat16 ::kvsieve_dtype_t. */
#define KVSIEVE_DTYPE_BF16 {KVSIEVE_DTYPE_CODE_BFLOAT, 16, 1}

/**
 * \brief A borrowed tensor, laid out exactly like DLPack's `DLTensor`, so that
 * `&managed->dl_tensor` of a `DLManagedTensor` can be passed (cast) as is.
 *
 * - `data`: first byte of the allocation; the first element is at `data + byte_offset`.
 *   May be NULL only if the tensor has no elements.
 * - `device`: #KVSIEVE_DEVICE_CPU, except for the `kvsieve_cuda_*` functions, which take
 *   #KVSIEVE_DEVICE_CUDA (or #KVSIEVE_DEVICE_CUDA_MANAGED) with `device_id` the device ordinal.
 * - `ndim`, `shape`: each function states the shape it expects; sizes are non-negative.
 * - `strides`: in elements, one per dimension, non-negative; NULL means contiguous
 *   row-major. Any stride is accepted, including for the last dimension.
 *
 * Ownership: the caller owns the descriptor and the memory it points to; kvsieve reads
 * (or, for outputs, writes) it only during the call that receives it.
 */
typedef struct kvsieve_tensor {
    void *data;
    kvsieve_device_t device;
    int32_t ndim;
    kvsieve_dtype_t dtype;
    const int64_t *shape;
    const int64_t *strides;
    uint64_t byte_offset;
} kvsieve_tensor_t;

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* KVSIEVE_TENSOR_H */
