// `--cfg tokio_unstable` (optional) lets the simulation seed tokio's own
// random choices (`select!` branch order) too; declare it so rustc's
// check-cfg does not warn when it is absent.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(tokio_unstable)");
}
