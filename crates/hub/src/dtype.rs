//! The dtype of exported weights.

use tch::Kind;

/// Weight dtype of `model.safetensors`. Training keeps fp32 master weights, so `Fp32` exports
/// them bit for bit; `Bf16` and `Fp16` round them (as PyTorch's `.to(dtype)` does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Fp32,
    Bf16,
    Fp16,
}

impl Dtype {
    /// Every dtype, in the order the CLI lists them.
    pub const ALL: [Dtype; 3] = [Dtype::Fp32, Dtype::Bf16, Dtype::Fp16];

    /// The command-line spelling: "fp32", "bf16", "fp16".
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Fp32 => "fp32",
            Dtype::Bf16 => "bf16",
            Dtype::Fp16 => "fp16",
        }
    }

    /// The dtype a command-line spelling names.
    pub fn from_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == name)
    }

    /// PyTorch's name, as `config.json`'s `dtype` gives it.
    pub fn torch_name(self) -> &'static str {
        match self {
            Dtype::Fp32 => "float32",
            Dtype::Bf16 => "bfloat16",
            Dtype::Fp16 => "float16",
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Dtype::Fp32 => Kind::Float,
            Dtype::Bf16 => Kind::BFloat16,
            Dtype::Fp16 => Kind::Half,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_name(d.name()), Some(d));
        }
        assert_eq!(Dtype::from_name("float32"), None);
        assert_eq!(Dtype::Bf16.torch_name(), "bfloat16");
    }
}
