"""KServe's v2 tensor objects (`InferInput`, `InferOutput`, `InferResponse`) to and from plain
data, with the checks KServe skips: a tensor whose data does not fill its shape is a 400 here, a
500 from numpy's reshape in KServe 0.21. Torch-free.
"""
from __future__ import annotations

import numpy as np
from kserve import InferInput, InferOutput, InferRequest, InferResponse
from kserve.protocol.infer_type import deserialize_bytes_tensor
from kserve.utils.numpy_codec import to_np_dtype

from serving.errors import BAD_REQUEST, UNPROCESSABLE, RequestError
from serving.transform import Tensor


def _raw(infer_input: InferInput) -> bytes | None:
    return getattr(infer_input, "_raw_data", None)  # KServe keeps raw gRPC/REST binary contents here


def to_tensor(infer_input: InferInput, k: int) -> Tensor:
    """An input as a `Tensor` with flat data; binary contents decoded but not yet reshaped."""
    raw, datatype = _raw(infer_input), str(infer_input.datatype).upper()
    if raw is None:
        return Tensor(infer_input.name, datatype, list(infer_input.shape), infer_input.data or [])
    if datatype == "BYTES":
        return Tensor(infer_input.name, datatype, list(infer_input.shape), deserialize_bytes_tensor(raw))
    dtype = to_np_dtype(datatype)
    if dtype is None:
        raise RequestError(UNPROCESSABLE, f"inputs[{k}].datatype", f"unknown datatype {datatype!r}")
    if len(raw) % np.dtype(dtype).itemsize:
        raise RequestError(BAD_REQUEST, f"inputs[{k}].data", f"{len(raw)} bytes are not whole {datatype} values")
    return Tensor(infer_input.name, datatype, list(infer_input.shape), np.frombuffer(raw, dtype=dtype))


def to_array(infer_input: InferInput, k: int) -> np.ndarray:
    """An input as a numpy array of its declared shape and datatype.

    Raises:
        RequestError: 400 when the data does not fill the shape, 422 when it is not of the datatype.
    """
    tensor = to_tensor(infer_input, k)
    shape = tensor.shape
    if not all(type(d) is int and d >= 0 for d in shape):
        raise RequestError(BAD_REQUEST, f"inputs[{k}].shape", f"shape must be a list of sizes, got {shape!r}")
    try:
        array = np.asarray(tensor.data, dtype=to_np_dtype(tensor.datatype))
    except (TypeError, ValueError) as err:
        raise RequestError(UNPROCESSABLE, f"inputs[{k}].data", f"values are not {tensor.datatype}: {err}") from None
    if array.size != int(np.prod(shape)):
        raise RequestError(BAD_REQUEST, f"inputs[{k}].data", f"{array.size} values do not fill shape {shape}")
    return array.reshape(shape)


def to_output(tensor: Tensor, binary: bool) -> InferOutput:
    """A `Tensor` as KServe's `InferOutput`; binary (raw contents) when the caller sent binary."""
    output = InferOutput(tensor.name, list(tensor.shape), tensor.datatype)
    if isinstance(tensor.data, np.ndarray):
        output.set_data_from_numpy(tensor.data, binary_data=binary)
    else:
        output.data = list(tensor.data)
    return output


def response(request: InferRequest, model_name: str, model_version: str | None, request_id: str | None,
             tensors: list[Tensor]) -> InferResponse:
    """The v2 response to `request`: binary outputs iff the request asked for them (raw gRPC
    inputs or REST `binary_data_output`), as KServe's own predictors answer. Its id is the
    request's own `id` when it has one (the Open Inference Protocol: "if specified this identifier
    must be returned in the response"), else `request_id` (the `x-request-id` the call went by)."""
    binary = request.use_binary_outputs
    outputs = [to_output(tensor, binary) for tensor in tensors]
    return InferResponse(request.id or request_id or "", model_name, outputs, model_version=model_version,
                         use_binary_outputs=binary)
