// sqlx::migrate! embeds migrations/ at build time: rebuild when a migration changes.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
