//! Builds `native/lazy_dir_env.cc` against the RocksDB that `librocksdb-sys` compiled.

fn main() {
    println!("cargo:rerun-if-changed=native/lazy_dir_env.cc");
    let rocksdb_src = std::env::var("DEP_ROCKSDB_CARGO_MANIFEST_DIR")
        .expect("librocksdb-sys exports its manifest dir (links = \"rocksdb\")");
    let root = std::path::Path::new(&rocksdb_src).join("rocksdb");
    cc::Build::new()
        .cpp(true)
        .file("native/lazy_dir_env.cc")
        .include(root.join("include"))
        .include(&root)
        .flag("-std=c++20")
        .define("NDEBUG", Some("1"))
        .define("ROCKSDB_PLATFORM_POSIX", None)
        .define("ROCKSDB_LIB_IO_POSIX", None)
        .define("OS_LINUX", None)
        .warnings(false)
        .compile("prkv_native");
}
