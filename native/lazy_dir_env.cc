// An Env whose directory handles hold no file descriptor.
//
// RocksDB keeps several directory objects open per database (for the DB directory, each column
// family's data path, the WAL directory ...), each holding an open file descriptor, only to fsync
// the directory after creating or renaming files. With one RocksDB per Region that is four
// descriptors per tablet, which made 1,000 tablets exceed a 4,096 descriptor limit. The
// directories here open the directory only for the duration of an fsync.
//
// The background thread pools stay those of RocksDB's default Env: every tablet shares them.

#include <memory>
#include <string>

#include "rocksdb/env.h"
#include "rocksdb/file_system.h"

using ROCKSDB_NAMESPACE::DirFsyncOptions;
using ROCKSDB_NAMESPACE::Env;
using ROCKSDB_NAMESPACE::FileSystem;
using ROCKSDB_NAMESPACE::FileSystemWrapper;
using ROCKSDB_NAMESPACE::FSDirectory;
using ROCKSDB_NAMESPACE::IODebugContext;
using ROCKSDB_NAMESPACE::IOOptions;
using ROCKSDB_NAMESPACE::IOStatus;

namespace {

class LazyDirectory : public FSDirectory {
 public:
  LazyDirectory(std::shared_ptr<FileSystem> fs, std::string name)
      : fs_(std::move(fs)), name_(std::move(name)) {}

  IOStatus Fsync(const IOOptions& options, IODebugContext* dbg) override {
    std::unique_ptr<FSDirectory> dir;
    IOStatus s = fs_->NewDirectory(name_, options, &dir, dbg);
    if (!s.ok()) {
      return s;
    }
    s = dir->Fsync(options, dbg);
    IOStatus c = dir->Close(options, dbg);
    return s.ok() ? c : s;
  }

  IOStatus FsyncWithDirOptions(const IOOptions& options, IODebugContext* dbg,
                               const DirFsyncOptions& dir_options) override {
    std::unique_ptr<FSDirectory> dir;
    IOStatus s = fs_->NewDirectory(name_, options, &dir, dbg);
    if (!s.ok()) {
      return s;
    }
    s = dir->FsyncWithDirOptions(options, dbg, dir_options);
    IOStatus c = dir->Close(options, dbg);
    return s.ok() ? c : s;
  }

  IOStatus Close(const IOOptions& /*options*/, IODebugContext* /*dbg*/) override {
    return IOStatus::OK();
  }

 private:
  std::shared_ptr<FileSystem> fs_;
  std::string name_;
};

class LazyDirFileSystem : public FileSystemWrapper {
 public:
  explicit LazyDirFileSystem(const std::shared_ptr<FileSystem>& target)
      : FileSystemWrapper(target), base_(target) {}

  static const char* kClassName() { return "PrkvLazyDirFileSystem"; }
  const char* Name() const override { return kClassName(); }

  IOStatus NewDirectory(const std::string& name, const IOOptions& options,
                        std::unique_ptr<FSDirectory>* result,
                        IODebugContext* dbg) override {
    // Open once so that a missing or unreadable directory fails here, as it would without us.
    std::unique_ptr<FSDirectory> probe;
    IOStatus s = target()->NewDirectory(name, options, &probe, dbg);
    if (!s.ok()) {
      return s;
    }
    s = probe->Close(options, dbg);
    if (!s.ok()) {
      return s;
    }
    result->reset(new LazyDirectory(base_, name));
    return IOStatus::OK();
  }

 private:
  std::shared_ptr<FileSystem> base_;
};

}  // namespace

// Mirrors the C API's private `rocksdb_env_t` (db/c.cc of the RocksDB version librocksdb-sys
// builds), so that `rocksdb_env_destroy` and `rocksdb_options_set_env` accept our Env.
struct rocksdb_env_t {
  Env* rep;
  bool is_default;
};

extern "C" rocksdb_env_t* prkv_lazy_dir_env_create() {
  auto fs = std::make_shared<LazyDirFileSystem>(FileSystem::Default());
  std::unique_ptr<Env> env = ROCKSDB_NAMESPACE::NewCompositeEnv(fs);
  auto* wrapper = new rocksdb_env_t;
  wrapper->rep = env.release();
  wrapper->is_default = false;
  return wrapper;
}
