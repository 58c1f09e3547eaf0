//! Tensors between wasi-nn and ONNX Runtime: checked against what the graph declares (name,
//! element type, rank, fixed dimensions, byte length) and converted both ways.

use ort::tensor::TensorElementType;
use ort::value::{DynValue, Tensor as OrtTensor, ValueType};
use wasmtime_wasi_nn::Tensor;
use wasmtime_wasi_nn::wit::TensorType;

use crate::NnError;

/// One declared input of a graph.
#[derive(Debug, Clone)]
pub(crate) struct InputSpec {
    pub(crate) name: String,
    pub(crate) ty: TensorElementType,
    /// -1 where the dimension is dynamic.
    pub(crate) shape: Vec<i64>,
    /// The dimensions' symbolic names (empty where the graph gives none).
    pub(crate) symbols: Vec<String>,
}

pub(crate) fn wasi_type_name(ty: TensorType) -> &'static str {
    match ty {
        TensorType::Fp16 => "FP16",
        TensorType::Fp32 => "FP32",
        TensorType::Fp64 => "FP64",
        TensorType::Bf16 => "BF16",
        TensorType::U8 => "U8",
        TensorType::I32 => "I32",
        TensorType::I64 => "I64",
    }
}

pub(crate) fn element_size(ty: TensorType) -> usize {
    match ty {
        TensorType::U8 => 1,
        TensorType::Fp16 | TensorType::Bf16 => 2,
        TensorType::Fp32 | TensorType::I32 => 4,
        TensorType::Fp64 | TensorType::I64 => 8,
    }
}

pub(crate) fn wasi_to_ort(ty: TensorType) -> TensorElementType {
    match ty {
        TensorType::Fp16 => TensorElementType::Float16,
        TensorType::Fp32 => TensorElementType::Float32,
        TensorType::Fp64 => TensorElementType::Float64,
        TensorType::Bf16 => TensorElementType::Bfloat16,
        TensorType::U8 => TensorElementType::Uint8,
        TensorType::I32 => TensorElementType::Int32,
        TensorType::I64 => TensorElementType::Int64,
    }
}

pub(crate) fn check_shape(spec: &InputSpec, t: &Tensor) -> Result<(), NnError> {
    let name = &spec.name;
    if wasi_to_ort(t.ty) != spec.ty {
        return Err(NnError::InvalidInput(format!(
            "input '{name}' is {}; the graph expects {:?}",
            wasi_type_name(t.ty),
            spec.ty
        )));
    }
    if !spec.shape.is_empty() && t.dimensions.len() != spec.shape.len() {
        return Err(NnError::InvalidInput(format!(
            "input '{name}' has rank {}; the graph expects rank {} {:?}",
            t.dimensions.len(),
            spec.shape.len(),
            spec.shape
        )));
    }
    for (i, (&got, &want)) in t.dimensions.iter().zip(spec.shape.iter()).enumerate() {
        if want >= 0 && i64::from(got) != want {
            return Err(NnError::InvalidInput(format!(
                "input '{name}' dimension {i} is {got}; the graph expects {want}"
            )));
        }
    }
    let elements = t.dimensions.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d as usize));
    let expected = elements.and_then(|n| n.checked_mul(element_size(t.ty)));
    if expected != Some(t.data.len()) {
        return Err(NnError::InvalidInput(format!(
            "input '{name}' has {} bytes; dimensions {:?} of {} need {}",
            t.data.len(),
            t.dimensions,
            wasi_type_name(t.ty),
            expected.map_or_else(|| "too many".to_string(), |n| n.to_string())
        )));
    }
    Ok(())
}

macro_rules! le_vec {
    ($data:expr, $t:ty, $n:expr) => {
        $data
            .chunks_exact($n)
            .map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or([0; $n])))
            .collect::<Vec<$t>>()
    };
}

pub(crate) fn to_ort(spec: &InputSpec, t: &Tensor) -> Result<DynValue, NnError> {
    let shape: Vec<i64> = t.dimensions.iter().map(|&d| i64::from(d)).collect();
    let err = |e: ort::Error| NnError::InvalidInput(format!("input '{}': {e}", spec.name));
    let data = &t.data;
    Ok(match t.ty {
        TensorType::I64 => OrtTensor::from_array((shape, le_vec!(data, i64, 8))).map_err(err)?.into_dyn(),
        TensorType::I32 => OrtTensor::from_array((shape, le_vec!(data, i32, 4))).map_err(err)?.into_dyn(),
        TensorType::Fp32 => OrtTensor::from_array((shape, le_vec!(data, f32, 4))).map_err(err)?.into_dyn(),
        TensorType::Fp64 => OrtTensor::from_array((shape, le_vec!(data, f64, 8))).map_err(err)?.into_dyn(),
        TensorType::U8 => OrtTensor::from_array((shape, data.clone())).map_err(err)?.into_dyn(),
        TensorType::Fp16 => {
            OrtTensor::from_array((shape, le_vec!(data, half::f16, 2))).map_err(err)?.into_dyn()
        }
        TensorType::Bf16 => {
            OrtTensor::from_array((shape, le_vec!(data, half::bf16, 2))).map_err(err)?.into_dyn()
        }
    })
}

pub(crate) fn from_ort(name: &str, value: &ort::value::ValueRef<'_>) -> Result<Tensor, NnError> {
    let ValueType::Tensor { ty, .. } = value.dtype() else {
        return Err(NnError::UnsupportedOutput(format!("output '{name}' is not a tensor")));
    };
    let fail = |e: ort::Error| NnError::Inference(format!("reading output '{name}': {e}"));
    macro_rules! take {
        ($t:ty, $wasi:expr) => {{
            let (shape, data) = value.try_extract_tensor::<$t>().map_err(fail)?;
            let dims = shape.iter().map(|&d| u32::try_from(d).unwrap_or(0)).collect();
            Tensor::new(dims, $wasi, data.iter().flat_map(|v| v.to_le_bytes()).collect())
        }};
    }
    Ok(match ty {
        TensorElementType::Float32 => take!(f32, TensorType::Fp32),
        TensorElementType::Float64 => take!(f64, TensorType::Fp64),
        TensorElementType::Float16 => take!(half::f16, TensorType::Fp16),
        TensorElementType::Bfloat16 => take!(half::bf16, TensorType::Bf16),
        TensorElementType::Int64 => take!(i64, TensorType::I64),
        TensorElementType::Int32 => take!(i32, TensorType::I32),
        TensorElementType::Uint8 => take!(u8, TensorType::U8),
        other => {
            return Err(NnError::UnsupportedOutput(format!(
                "output '{name}' has element type {other:?}, which wasi-nn cannot carry"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InputSpec {
        InputSpec {
            name: "input_ids".into(),
            ty: TensorElementType::Int64,
            shape: vec![-1, -1],
            symbols: vec![],
        }
    }

    fn tensor(dims: &[u32], ty: TensorType, bytes: usize) -> Tensor {
        Tensor::new(dims.to_vec(), ty, vec![0; bytes])
    }

    #[test]
    fn a_well_formed_tensor_passes() {
        assert!(check_shape(&spec(), &tensor(&[2, 3], TensorType::I64, 48)).is_ok());
    }

    #[test]
    fn wrong_type_rank_dims_and_length_are_named() {
        let e = |t: Tensor| check_shape(&spec(), &t).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            e(tensor(&[1, 2], TensorType::Fp32, 8)).contains("'input_ids' is FP32; the graph expects Int64")
        );
        assert!(e(tensor(&[2], TensorType::I64, 16)).contains("rank 1; the graph expects rank 2"));
        assert!(
            e(tensor(&[2, 3], TensorType::I64, 40))
                .contains("has 40 bytes; dimensions [2, 3] of I64 need 48")
        );
        let fixed = InputSpec { shape: vec![1, 4], ..spec() };
        let msg = check_shape(&fixed, &tensor(&[1, 5], TensorType::I64, 40)).err().map(|e| e.to_string());
        assert!(msg.unwrap_or_default().contains("dimension 1 is 5; the graph expects 4"));
        // a product that overflows is refused, not wrapped
        assert!(e(tensor(&[u32::MAX, u32::MAX], TensorType::I64, 8)).contains("too many"));
    }

    #[test]
    fn little_endian_bytes_become_values() {
        let bytes: Vec<u8> = [1i64, -2].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(le_vec!(bytes, i64, 8), vec![1, -2]);
    }
}
