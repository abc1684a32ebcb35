//! The writer's WAL, written one transaction at a time.
//!
//! SQLite appends every page a transaction changed to the WAL as a frame, and writes each
//! frame with two `write` calls: its 24-byte header, then the page. A reservation changes
//! three pages, so it costs six system calls, and a ten-line cart about forty: with the
//! store's 1 KiB pages, profiles put these calls at 30–40% of a writer's time.
//!
//! The writer's connection therefore opens its files through this VFS, a thin layer over
//! SQLite's default one (or its `unix-excl` one, see [`Sharing`]) that changes a single
//! thing: the WAL file's appends are gathered in memory and handed to the file in one
//! write once the transaction's commit frame is complete. That is before SQLite
//! publishes the commit in the WAL index, so no reader, in this process or another, can
//! see a commit whose frames are not in the file yet, and a sync of the WAL after the
//! commit covers all of them. Everything else (the database file, locks, the WAL index)
//! is SQLite's own file, untouched.
//!
//! What keeps it simple and safe:
//! - Only appends are gathered. A write at an offset the log has already reached (SQLite
//!   rewrites a frame in place when a transaction that spilled pages to the WAL changes
//!   one of them again, and then rewrites checksums) writes everything through, at once,
//!   until the log starts over with a new header.
//! - Every other call on the WAL (read, sync, size, truncate, close) writes what is
//!   gathered first, so SQLite never sees the file differ from what it wrote.
//! - At most [`CAP`] bytes are held: a larger transaction writes in pieces of that size
//!   (its frames are not visible to anyone until the commit frame is written).

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ptr;
use std::sync::OnceLock;

use rusqlite::ffi;

use super::Sharing;

/// The WAL file's header, written at offset 0 when the log (re)starts.
const WAL_HEADER: usize = 32;
/// A frame's header, the bytes a WAL frame adds to its page; bytes 4..8 hold the
/// database size after a commit, 0 otherwise.
pub(crate) const FRAME_HEADER: usize = 24;
/// The most bytes handed to the file in one write: SQLite's unix VFS writes at most
/// 128 KiB - 1 bytes in one call (it masks larger sizes and reports a full disk).
const CAP: usize = 64 << 10;

/// The two layers this module registers: over SQLite's default VFS, and over its
/// `unix-excl` one, for stores that keep the file to their process
/// ([`Sharing::ThisProcess`]).
static REGISTERED: [OnceLock<Result<(), String>>; 2] = [OnceLock::new(), OnceLock::new()];

/// What SQLite is given to register: a copy of the wrapped VFS, with the wrapped one
/// beside it for [`open`] to find. The copy comes first, so that SQLite's pointer to
/// the `sqlite3_vfs` is a pointer to this.
#[repr(C)]
struct Layer {
    vfs: ffi::sqlite3_vfs,
    real: *mut ffi::sqlite3_vfs,
}

/// Registers the layer over the VFS that `sharing` opens files with (see
/// [`Sharing::vfs`]), once per process, and returns its name, for
/// [`rusqlite::Connection::open_with_flags_and_vfs`]; the error says why it could not be.
pub(crate) fn register(sharing: Sharing) -> Result<&'static CStr, String> {
    let (slot, name) = match sharing {
        Sharing::Processes => (0, c"stockroom-wal"),
        Sharing::ThisProcess => (1, c"stockroom-wal-excl"),
    };
    let base = sharing.vfs();
    REGISTERED[slot]
        .get_or_init(|| {
            // SAFETY: sqlite3_vfs_find initialises SQLite and returns a VFS that lives as
            // long as the process; the layer registered here is leaked, as SQLite keeps a
            // pointer to it for good.
            unsafe {
                let real = ffi::sqlite3_vfs_find(base.map_or(ptr::null(), CStr::as_ptr));
                if real.is_null() {
                    return Err(match base {
                        Some(b) => format!("SQLite has no {b:?} VFS on this platform"),
                        None => "SQLite has no default VFS".into(),
                    });
                }
                let Ok(size) = c_int::try_from(REAL_OFFSET + (*real).szOsFile as usize) else {
                    return Err("the wrapped VFS's files are too large to wrap".into());
                };
                // A copy of the wrapped VFS with its own name, file size and `open`: every
                // other method (delete, access, full path, sleep, time...) is the wrapped
                // VFS's own, with the same `pAppData`; the unix VFS's ignore which VFS
                // pointer they are called with. `open` opens files through the wrapped
                // VFS itself, which is how `unix-excl` tells its files from others.
                let mut vfs = *real;
                vfs.szOsFile = size;
                vfs.zName = name.as_ptr();
                vfs.pNext = ptr::null_mut();
                vfs.xOpen = Some(open);
                let layer = Box::into_raw(Box::new(Layer { vfs, real }));
                match ffi::sqlite3_vfs_register(layer.cast(), 0) {
                    ffi::SQLITE_OK => Ok(()),
                    rc => {
                        drop(Box::from_raw(layer));
                        Err(format!("SQLite refused to register a VFS (code {rc})"))
                    }
                }
            }
        })
        .clone()
        .map(|()| name)
}

/// A WAL file of the writer: SQLite's own file behind it, and the appends gathered.
#[repr(C)]
struct WalFile {
    /// What SQLite sees: its `pMethods` points to [`METHODS`]. First, so that a pointer
    /// to the `sqlite3_file` is a pointer to this.
    base: ffi::sqlite3_file,
    /// The wrapped VFS's file, in the same allocation, [`REAL_OFFSET`] bytes in.
    real: *mut ffi::sqlite3_file,
    /// Bytes gathered for offset `start` on.
    buf: Vec<u8>,
    start: i64,
    /// The furthest offset written since the log's header: a write before it rewrites.
    end: i64,
    /// The last write was the header of a commit frame: its page completes the commit.
    commit: bool,
    /// Write everything through until the log starts over.
    through: bool,
}

/// Where the wrapped VFS's file starts within the space SQLite gives a file.
const REAL_OFFSET: usize = size_of::<WalFile>().next_multiple_of(16);

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 1,
    xClose: Some(close),
    xRead: Some(read),
    xWrite: Some(write),
    xTruncate: Some(truncate),
    xSync: Some(sync),
    xFileSize: Some(file_size),
    xLock: Some(lock),
    xUnlock: Some(unlock),
    xCheckReservedLock: Some(check_reserved_lock),
    xFileControl: Some(file_control),
    xSectorSize: Some(sector_size),
    xDeviceCharacteristics: Some(device_characteristics),
    xShmMap: None,
    xShmLock: None,
    xShmBarrier: None,
    xShmUnmap: None,
    xFetch: None,
    xUnfetch: None,
};

/// Opens a file: the WAL wrapped, anything else as the wrapped VFS's own file, in place.
unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite calls this with the `Layer` that `register` gave it, and gives
    // `file` szOsFile bytes (REAL_OFFSET more than the wrapped VFS needs), 8-byte
    // aligned.
    unsafe {
        let real_vfs = (*vfs.cast::<Layer>()).real;
        let Some(real_open) = (*real_vfs).xOpen else {
            (*file).pMethods = ptr::null();
            return ffi::SQLITE_CANTOPEN;
        };
        if flags & ffi::SQLITE_OPEN_WAL == 0 {
            return real_open(real_vfs, name, file, flags, out_flags);
        }
        let real = file
            .cast::<u8>()
            .add(REAL_OFFSET)
            .cast::<ffi::sqlite3_file>();
        (*real).pMethods = ptr::null();
        let rc = real_open(real_vfs, name, real, flags, out_flags);
        if rc != ffi::SQLITE_OK || (*real).pMethods.is_null() {
            (*file).pMethods = ptr::null();
            return rc;
        }
        file.cast::<WalFile>().write(WalFile {
            base: ffi::sqlite3_file { pMethods: &METHODS },
            real,
            buf: Vec::new(),
            start: 0,
            end: 0,
            commit: false,
            through: false,
        });
        ffi::SQLITE_OK
    }
}

/// The wrapped file behind `file`.
///
/// # Safety
/// `file` was opened by [`open`] as a WAL (its methods are [`METHODS`]) and not closed.
unsafe fn wal<'a>(file: *mut ffi::sqlite3_file) -> &'a mut WalFile {
    // SAFETY: as the caller promises, `file` points to a live WalFile.
    unsafe { &mut *file.cast::<WalFile>() }
}

impl WalFile {
    /// The wrapped VFS's methods for the file behind this one.
    fn methods(&self) -> &ffi::sqlite3_io_methods {
        // SAFETY: `real` was opened successfully, so its methods are set until closed.
        unsafe { &*(*self.real).pMethods }
    }

    fn write_through(&mut self, data: *const c_void, amt: c_int, offset: i64) -> c_int {
        #[cfg(test)]
        tests::WRITES.with(|w| w.set(w.get() + 1));
        match self.methods().xWrite {
            // SAFETY: `real` is open; `data` holds `amt` bytes.
            Some(write) => unsafe { write(self.real, data, amt, offset) },
            None => ffi::SQLITE_IOERR_WRITE,
        }
    }

    /// Writes what is gathered, in one call.
    fn flush(&mut self) -> c_int {
        if self.buf.is_empty() {
            return ffi::SQLITE_OK;
        }
        let rc = match c_int::try_from(self.buf.len()) {
            Ok(len) => self.write_through(self.buf.as_ptr().cast(), len, self.start),
            Err(_) => ffi::SQLITE_IOERR_WRITE,
        };
        self.buf.clear();
        rc
    }
}

unsafe extern "C" fn write(
    file: *mut ffi::sqlite3_file,
    data: *const c_void,
    amt: c_int,
    offset: i64,
) -> c_int {
    // SAFETY: SQLite calls the methods of a WAL opened by `open`; `data` holds `amt` bytes.
    let (w, bytes) = unsafe {
        let len = usize::try_from(amt).unwrap_or(0);
        if len == 0 || data.is_null() {
            return ffi::SQLITE_OK;
        }
        (
            wal(file),
            std::slice::from_raw_parts(data.cast::<u8>(), len),
        )
    };
    if offset == 0 && bytes.len() == WAL_HEADER {
        // The log starts over: appends again from here.
        w.through = false;
        w.end = 0;
    }
    if offset < w.end {
        w.through = true;
    }
    w.end = w.end.max(offset + i64::from(amt));
    if w.through {
        w.commit = false;
        let rc = w.flush();
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        return w.write_through(data, amt, offset);
    }
    if !w.buf.is_empty()
        && (offset != w.start + w.buf.len() as i64 || w.buf.len() + bytes.len() > CAP)
    {
        let rc = w.flush();
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    if w.buf.is_empty() {
        w.start = offset;
    }
    w.buf.extend_from_slice(bytes);
    if w.commit {
        // The commit frame's page: the transaction's frames go to the file now, before
        // SQLite publishes the commit.
        w.commit = false;
        return w.flush();
    }
    if bytes.len() == FRAME_HEADER && bytes[4..8] != [0; 4] {
        w.commit = true;
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn close(file: *mut ffi::sqlite3_file) -> c_int {
    // SAFETY: a WAL opened by `open`, closed once; its buffer is dropped here, and SQLite
    // frees the space after this returns.
    unsafe {
        let w = wal(file);
        let flushed = w.flush();
        let closed = match w.methods().xClose {
            Some(close) => close(w.real),
            None => ffi::SQLITE_OK,
        };
        ptr::drop_in_place(&mut w.buf);
        (*file).pMethods = ptr::null();
        if flushed != ffi::SQLITE_OK {
            flushed
        } else {
            closed
        }
    }
}

unsafe extern "C" fn truncate(file: *mut ffi::sqlite3_file, size: i64) -> c_int {
    // SAFETY: a WAL opened by `open`.
    let w = unsafe { wal(file) };
    let rc = w.flush();
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    w.end = w.end.min(size);
    match w.methods().xTruncate {
        Some(truncate) => unsafe { truncate(w.real, size) },
        None => ffi::SQLITE_IOERR_TRUNCATE,
    }
}

/// Forwards a method to the wrapped VFS's file; with `flush`, after writing what is
/// gathered (for the methods that read, sync or measure the file).
macro_rules! forward {
    (flush $name:ident, $method:ident, ($($arg:ident: $ty:ty),*), $missing:expr) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            // SAFETY: a WAL opened by `open`; the arguments are SQLite's, passed on.
            let w = unsafe { wal(file) };
            match w.flush() {
                ffi::SQLITE_OK => forward!(@call w, $method, ($($arg),*), $missing),
                rc => rc,
            }
        }
    };
    ($name:ident, $method:ident, ($($arg:ident: $ty:ty),*), $missing:expr) => {
        unsafe extern "C" fn $name(file: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> c_int {
            // SAFETY: a WAL opened by `open`; the arguments are SQLite's, passed on.
            let w = unsafe { wal(file) };
            forward!(@call w, $method, ($($arg),*), $missing)
        }
    };
    (@call $w:ident, $method:ident, ($($arg:ident),*), $missing:expr) => {
        match $w.methods().$method {
            Some(f) => unsafe { f($w.real $(, $arg)*) },
            None => $missing,
        }
    };
}

forward!(flush read, xRead, (data: *mut c_void, amt: c_int, offset: i64), ffi::SQLITE_IOERR_READ);
forward!(flush sync, xSync, (flags: c_int), ffi::SQLITE_IOERR_FSYNC);
forward!(flush file_size, xFileSize, (size: *mut i64), ffi::SQLITE_IOERR_FSTAT);
forward!(lock, xLock, (level: c_int), ffi::SQLITE_OK);
forward!(unlock, xUnlock, (level: c_int), ffi::SQLITE_OK);
forward!(check_reserved_lock, xCheckReservedLock, (out: *mut c_int), ffi::SQLITE_OK);
forward!(file_control, xFileControl, (op: c_int, arg: *mut c_void), ffi::SQLITE_NOTFOUND);
forward!(sector_size, xSectorSize, (), 4096);
forward!(device_characteristics, xDeviceCharacteristics, (), 0);

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::path::Path;

    use rusqlite::{Connection, OpenFlags};

    thread_local! {
        /// Writes this thread's WAL files passed to the wrapped VFS.
        pub(super) static WRITES: Cell<u64> = const { Cell::new(0) };
    }

    fn writer(path: &Path) -> Connection {
        let conn = Connection::open_with_flags_and_vfs(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
            super::register(super::Sharing::Processes).unwrap(),
        )
        .unwrap();
        conn.execute_batch(
            "PRAGMA page_size = 1024; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
             PRAGMA wal_autocheckpoint = 0; \
             CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, pad TEXT NOT NULL);",
        )
        .unwrap();
        conn
    }

    /// What a process that crashed now would leave: the database and its WAL as they are
    /// in the file system, opened through SQLite's default VFS (which recovers the WAL
    /// from the frames' checksums alone). Returns the rows and the sum of `n`.
    fn crash_image(path: &Path, into: &Path) -> (i64, i64) {
        let copy = into.join("copy.db");
        for suffix in ["", "-wal"] {
            let from = format!("{}{suffix}", path.display());
            let to = format!("{}{suffix}", copy.display());
            std::fs::copy(from, to).unwrap();
        }
        let conn = Connection::open(&copy).unwrap();
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
        let out = conn
            .query_row("SELECT count(*), coalesce(sum(n), 0) FROM t", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        drop(conn);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", copy.display()));
        }
        out
    }

    #[test]
    fn a_commit_writes_its_frames_in_one_call_before_it_is_visible() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let conn = writer(&path);
        let reader = Connection::open(&path).unwrap();
        for i in 1..=20_i64 {
            let before = WRITES.get();
            conn.execute("INSERT INTO t (n, pad) VALUES (?1, 'x')", [i])
                .unwrap();
            // One frame (the table's only page), header and page: one write.
            assert_eq!(WRITES.get() - before, 1, "commit {i}");
            let seen: i64 = reader
                .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap();
            assert_eq!(seen, i);
        }
        let before = WRITES.get();
        conn.execute_batch(
            "WITH RECURSIVE s(v) AS (SELECT 1 UNION ALL SELECT v + 1 FROM s WHERE v < 50) \
             INSERT INTO t (n, pad) SELECT v, printf('%.200c', 'p') FROM s;",
        )
        .unwrap();
        // About a dozen pages changed, still one write.
        assert_eq!(WRITES.get() - before, 1);
        let sum = 20 * 21 / 2 + 50 * 51 / 2;
        assert_eq!(crash_image(&path, dir.path()), (70, sum));
    }

    #[test]
    fn frames_rewritten_in_place_are_written_through_and_recover() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let conn = writer(&path);
        // A cache of 10 pages: a transaction larger than that spills frames to the WAL
        // before its commit, then changes some of those pages again, which SQLite
        // rewrites in place (and then rewrites the checksums of the frames after them).
        conn.execute_batch("PRAGMA cache_size = 10").unwrap();
        let mut rows = 0;
        let mut sum = 0;
        for round in 0..3_i64 {
            let tx = conn.unchecked_transaction().unwrap();
            for i in 0..400_i64 {
                tx.execute(
                    "INSERT INTO t (n, pad) VALUES (?1, printf('%.300c', 'p'))",
                    [i],
                )
                .unwrap();
            }
            tx.execute("UPDATE t SET n = n + 1 WHERE id % 7 = ?1", [round])
                .unwrap();
            tx.commit().unwrap();
            rows += 400;
            let (count, total) = crash_image(&path, dir.path());
            let expected: i64 = conn
                .query_row("SELECT sum(n) FROM t", [], |r| r.get(0))
                .unwrap();
            sum = expected;
            assert_eq!((count, total), (rows, expected), "round {round}");
        }
        // After all that, small commits are gathered again once the log starts over.
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        conn.execute("INSERT INTO t (n, pad) VALUES (1, 'x')", [])
            .unwrap();
        let before = WRITES.get();
        conn.execute("INSERT INTO t (n, pad) VALUES (2, 'x')", [])
            .unwrap();
        assert_eq!(WRITES.get() - before, 1);
        assert_eq!(crash_image(&path, dir.path()), (rows + 2, sum + 3));
    }
}
