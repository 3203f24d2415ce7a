//! Fails early, with a useful message, when `bpf-linker` is missing, and
//! rebuilds the object when the linker is replaced (a new linker can change
//! the code the verifier sees).

fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => panic!(
            "bpf-linker not found ({err}); install it as described in \
             TOOLCHAIN.md (cargo install bpf-linker --no-default-features \
             --features llvm-22,no-llvm-linking, linked to the toolchain's LLVM)"
        ),
    }
}
