// Embeds the libtorch directory that torch-sys linked against as an rpath, so the binary and
// the test executables find libtorch at run time without LD_LIBRARY_PATH; and writes the
// TorchScript module of the int8 scoring GEMM (scripts/qlinear_module.py) into OUT_DIR.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // A CUDA libtorch: nothing here calls into libtorch_cuda.so directly, so the default
        // --as-needed link would drop it, its CUDA hooks would never register and libtorch
        // would see no device. Keep it a dependency of the binaries.
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
    int8_module();
    println!("cargo:rerun-if-changed=build.rs");
}

/// An empty file when the venv's Python cannot write it: int8 scoring is then reported as
/// unavailable at start and `auto` measures float32 and bfloat16 only.
fn int8_module() {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("qlinear.pt");
    println!("cargo:rerun-if-changed=scripts/qlinear_module.py");
    println!("cargo:rerun-if-env-changed=POLYRANK_PYTHON");
    let python = std::env::var("POLYRANK_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&python)
        .arg("scripts/qlinear_module.py")
        .arg(&out)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("cargo:warning=int8 scoring module not written ({python} scripts/qlinear_module.py failed); int8 scoring will be unavailable");
        std::fs::write(&out, b"").expect("writing an empty qlinear.pt");
    }
}
