// Embeds the libtorch directory that torch-sys linked against as an rpath, so the binary and
// the test executables find libtorch at run time without LD_LIBRARY_PATH.
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
    println!("cargo:rerun-if-changed=build.rs");
}
