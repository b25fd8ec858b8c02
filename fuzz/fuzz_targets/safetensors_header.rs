//! The safetensors reader on arbitrary bytes. First byte even: the bytes are the file. Odd: the next two bytes
//! are a header length n, then n header bytes and the data; the 8-byte length prefix is written for the fuzzer,
//! so mutations reach the header's JSON and the tensor table instead of dying at the prefix.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loracomp::engine::weights::TensorFile;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let owned;
    let bytes = match data.first() {
        Some(b) if b % 2 == 1 && data.len() >= 3 => {
            let n = (u16::from_le_bytes([data[1], data[2]]) as usize).min(data.len() - 3);
            let mut v = (n as u64).to_le_bytes().to_vec();
            v.extend_from_slice(&data[3..]);
            owned = v;
            &owned[..]
        }
        _ => data,
    };
    let path = Path::new("fuzz/adapter_model.safetensors");
    match TensorFile::from_bytes(path, bytes) {
        Ok(tf) => {
            for (name, (shape, values)) in &tf.tensors {
                assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
                assert!(values.iter().all(|v| v.is_finite()), "{name}");
            }
        }
        Err(e) => assert!(format!("{e:#}").contains("adapter_model.safetensors"), "error does not name the file: {e:#}"),
    }
});
