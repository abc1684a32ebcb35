//! SQLite's page cache, with one spare page number moved next to the database's end.
//!
//! When SQLite splits or merges b-tree pages it renumbers the new siblings in ascending
//! order (`balance_nonroot`), swapping two pages through a spare number: that of the
//! "pending byte" page, 1,048,577 with 1 KiB pages, which no database under 1 GiB
//! reaches. SQLite's default page cache remembers the largest number it has held, and
//! when the transaction ends and it is asked to drop any page past the database's end,
//! that mark makes it scan its whole hash table, one slot per cached page: 16,384 and
//! more with the writer's 16 MiB cache. Inserts at random places in an index (the ledger
//! by product, a cart's holds, orders by payment) make such a swap likely in most
//! transactions that carry several units, and profiles put the scan at 6.5% of all
//! samples (a seventh of the writer's work) with 8 callers reserving over 1,000 products.
//!
//! This layer passes every call to the page cache SQLite would use otherwise and changes
//! one thing: a page SQLite moves to the pending byte page's number is kept, until SQLite
//! moves it on, at the number just past the largest page this cache has held. No page of
//! that number is in the cache, so the spare is as free as the pending one; and it lies
//! right after the database's end, where the end-of-transaction trim looks at a few hash
//! slots only. SQLite sees the page under the number it gave it throughout.
//!
//! SQLite takes its page cache from its process-wide configuration, which can only be
//! changed before SQLite starts: [`install`] does so when the first store opens, and
//! leaves the default in place when SQLite has started already (another connection was
//! opened first in this process).

use std::ffi::{c_int, c_uint};
use std::ptr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use rusqlite::ffi;

/// SQLite's lock bytes start at this offset of every database file, and the page that
/// holds them never holds data (`PENDING_BYTE` in SQLite's source).
const PENDING_BYTE: u32 = 0x4000_0000;

/// The page cache this one passes its calls to.
static INNER: OnceLock<Methods> = OnceLock::new();

/// A page cache's methods, as SQLite's configuration holds them.
struct Methods(ffi::sqlite3_pcache_methods2);

// SAFETY: the only pointer inside, `pArg`, is handed back to the same cache's `xInit`
// and `xShutdown` only, as SQLite itself does from whichever thread starts it.
unsafe impl Send for Methods {}
// SAFETY: as above; everything else is a plain function pointer.
unsafe impl Sync for Methods {}

/// Makes this layer SQLite's page cache, once per process, if SQLite has not started.
/// Returns whether it is in use.
pub(crate) fn install() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let installed = configure();
        if installed {
            log::debug!("sqlite: page cache layer installed");
        } else {
            log::debug!("sqlite: SQLite had started already; its page cache stays as it is");
        }
        installed
    })
}

fn configure() -> bool {
    let mut inner = ffi::sqlite3_pcache_methods2 {
        iVersion: 0,
        pArg: ptr::null_mut(),
        xInit: None,
        xShutdown: None,
        xCreate: None,
        xCachesize: None,
        xPagecount: None,
        xFetch: None,
        xUnpin: None,
        xRekey: None,
        xTruncate: None,
        xDestroy: None,
        xShrink: None,
    };
    // SAFETY: both options only read or write SQLite's configuration (the second copies
    // the struct), and SQLite refuses both with SQLITE_MISUSE once it has started.
    unsafe {
        if ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETPCACHE2, &raw mut inner) != ffi::SQLITE_OK {
            return false;
        }
        let complete = inner.xCreate.is_some()
            && inner.xFetch.is_some()
            && inner.xUnpin.is_some()
            && inner.xRekey.is_some()
            && inner.xTruncate.is_some()
            && inner.xDestroy.is_some();
        if !complete {
            return false;
        }
        let inner = &INNER.get_or_init(|| Methods(inner)).0;
        let ours = ffi::sqlite3_pcache_methods2 {
            iVersion: inner.iVersion,
            pArg: inner.pArg,
            xInit: inner.xInit,
            xShutdown: inner.xShutdown,
            xCreate: Some(create),
            xCachesize: Some(cachesize),
            xPagecount: Some(pagecount),
            xFetch: Some(fetch),
            xUnpin: Some(unpin),
            xRekey: Some(rekey),
            xTruncate: Some(truncate),
            xDestroy: Some(destroy),
            xShrink: Some(shrink),
        };
        ffi::sqlite3_config(ffi::SQLITE_CONFIG_PCACHE2, &raw const ours) == ffi::SQLITE_OK
    }
}

fn inner() -> &'static ffi::sqlite3_pcache_methods2 {
    // A cache is only created through `create`, which SQLite calls after `install`.
    &INNER
        .get()
        .expect("installed before SQLite creates a cache")
        .0
}

/// How many pages were parked at a spare number (tests).
#[cfg(test)]
static PARKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One cache: the inner cache, and where the page at the pending number is.
///
/// SQLite calls one cache's methods one at a time (a cache belongs to one connection's
/// pager); the fields are atomics only so that the struct may be shared at all.
struct Cache {
    inner: *mut ffi::sqlite3_pcache,
    /// The pending byte page's number at this cache's page size.
    pending: c_uint,
    /// No page numbered above this is in the inner cache.
    highest: AtomicU32,
    /// The spare number the page SQLite put at `pending` is kept at, 0 when none is...
    spare: AtomicU32,
    /// ...and that page.
    parked: AtomicPtr<ffi::sqlite3_pcache_page>,
}

/// # Safety
/// `p` was returned by [`create`] and has not been destroyed.
unsafe fn cache<'a>(p: *mut ffi::sqlite3_pcache) -> &'a Cache {
    // SAFETY: as the caller promises.
    unsafe { &*p.cast::<Cache>() }
}

impl Cache {
    /// The number the inner cache knows SQLite's page number `key` by.
    fn inner_key(&self, key: c_uint) -> c_uint {
        match self.spare.load(Ordering::Relaxed) {
            spare if spare != 0 && key == self.pending => spare,
            _ => key,
        }
    }

    /// Notes that the inner cache may hold page `key` from now on.
    fn holds(&self, key: c_uint) {
        if key < self.pending {
            self.highest.fetch_max(key, Ordering::Relaxed);
        }
    }

    /// The spare number for `page`, which SQLite moves to the pending number; the pending
    /// number itself when there is no spare below it (a database of 1 GiB or more).
    fn park(&self, page: *mut ffi::sqlite3_pcache_page) -> c_uint {
        let mut spare = self.spare.load(Ordering::Relaxed);
        if spare == 0 {
            // Above every page the inner cache holds, so free; and held from now on.
            spare = self.highest.load(Ordering::Relaxed) + 1;
            if spare >= self.pending {
                return self.pending;
            }
            self.spare.store(spare, Ordering::Relaxed);
            self.highest.store(spare, Ordering::Relaxed);
        }
        self.parked.store(page, Ordering::Relaxed);
        #[cfg(test)]
        PARKED.fetch_add(1, Ordering::Relaxed);
        spare
    }

    /// The page at the pending number has left it.
    fn unpark(&self) {
        self.spare.store(0, Ordering::Relaxed);
        self.parked.store(ptr::null_mut(), Ordering::Relaxed);
    }
}

unsafe extern "C" fn create(
    page_size: c_int,
    extra: c_int,
    purgeable: c_int,
) -> *mut ffi::sqlite3_pcache {
    // SAFETY: the inner cache's own method, called as SQLite calls it.
    let inner =
        unsafe { inner().xCreate.expect("checked at install")(page_size, extra, purgeable) };
    if inner.is_null() {
        return inner;
    }
    // SQLite's page sizes are powers of two from 512 to 65,536; any other value leaves
    // the pending number out of reach, and the layer passes everything through.
    let pending = u32::try_from(page_size)
        .ok()
        .filter(|&size| size >= 512)
        .map_or(c_uint::MAX, |size| PENDING_BYTE / size + 1);
    Box::into_raw(Box::new(Cache {
        inner,
        pending,
        highest: AtomicU32::new(0),
        spare: AtomicU32::new(0),
        parked: AtomicPtr::new(ptr::null_mut()),
    }))
    .cast()
}

unsafe extern "C" fn cachesize(p: *mut ffi::sqlite3_pcache, pages: c_int) {
    // SAFETY: SQLite passes back what `create` returned; the inner method as SQLite calls
    // it, on the inner cache.
    unsafe {
        if let Some(f) = inner().xCachesize {
            f(cache(p).inner, pages);
        }
    }
}

unsafe extern "C" fn pagecount(p: *mut ffi::sqlite3_pcache) -> c_int {
    // SAFETY: as in `cachesize`.
    unsafe { inner().xPagecount.map_or(0, |f| f(cache(p).inner)) }
}

unsafe extern "C" fn fetch(
    p: *mut ffi::sqlite3_pcache,
    key: c_uint,
    create: c_int,
) -> *mut ffi::sqlite3_pcache_page {
    // SAFETY: as in `cachesize`.
    unsafe {
        let c = cache(p);
        if create != 0 {
            let spare = c.spare.load(Ordering::Relaxed);
            if spare != 0 && key == spare {
                // A new page at the number the parked page is kept at: SQLite never
                // asks for one between the moves of a swap. Report no memory rather
                // than hand out the wrong page.
                return ptr::null_mut();
            }
            c.holds(key);
        }
        inner().xFetch.expect("checked at install")(c.inner, c.inner_key(key), create)
    }
}

unsafe extern "C" fn unpin(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    discard: c_int,
) {
    // SAFETY: as in `cachesize`.
    unsafe {
        let c = cache(p);
        if discard != 0 && page == c.parked.load(Ordering::Relaxed) {
            c.unpark();
        }
        inner().xUnpin.expect("checked at install")(c.inner, page, discard);
    }
}

unsafe extern "C" fn rekey(
    p: *mut ffi::sqlite3_pcache,
    page: *mut ffi::sqlite3_pcache_page,
    old: c_uint,
    new: c_uint,
) {
    // SAFETY: as in `cachesize`.
    unsafe {
        let c = cache(p);
        let from = c.inner_key(old);
        if old == c.pending {
            c.unpark();
        }
        let to = if new == c.pending {
            c.park(page)
        } else {
            c.holds(new);
            new
        };
        inner().xRekey.expect("checked at install")(c.inner, page, from, to);
    }
}

unsafe extern "C" fn truncate(p: *mut ffi::sqlite3_pcache, limit: c_uint) {
    // SAFETY: as in `cachesize`.
    unsafe {
        let c = cache(p);
        inner().xTruncate.expect("checked at install")(c.inner, limit);
        // Every page numbered `limit` or above is gone, the parked one among them.
        let spare = c.spare.load(Ordering::Relaxed);
        if spare != 0 && spare >= limit {
            c.unpark();
        }
        c.highest
            .fetch_min(limit.saturating_sub(1), Ordering::Relaxed);
    }
}

unsafe extern "C" fn destroy(p: *mut ffi::sqlite3_pcache) {
    // SAFETY: `p` came from `create` (Box::into_raw), and SQLite destroys a cache once.
    unsafe {
        let c = Box::from_raw(p.cast::<Cache>());
        inner().xDestroy.expect("checked at install")(c.inner);
    }
}

unsafe extern "C" fn shrink(p: *mut ffi::sqlite3_pcache) {
    // SAFETY: as in `cachesize`.
    unsafe {
        if let Some(f) = inner().xShrink {
            f(cache(p).inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::atomic::Ordering;

    use rusqlite::Connection;

    use super::{PARKED, install};

    /// Set in the process that runs [`child`].
    const CHILD: &str = "STOCKROOM_PCACHE_CHILD";

    #[test]
    fn pages_swapped_through_a_spare_number_end_where_sqlite_put_them() {
        // The layer can only be installed before SQLite starts, and other tests in this
        // process start it: the test runs in a process of its own.
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "store::sqlite::pcache::tests::child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "child failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("PCACHE-CHILD-DONE"), "{stdout}");
    }

    #[test]
    #[ignore = "run in a process of its own by the test above"]
    fn child() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        assert!(install(), "SQLite started before the layer was installed");
        for page_size in [1024, 4096] {
            random_index_inserts(page_size);
        }
        println!("PCACHE-CHILD-DONE");
    }

    /// Inserts rows at random places in an index, with every fifth transaction rolled
    /// back, and checks that splits swapped pages through the spare number and that the
    /// file, read again through a new connection, holds exactly the committed rows.
    fn random_index_inserts(page_size: u32) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swap.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA page_size = {page_size}; PRAGMA journal_mode = WAL; \
             PRAGMA cache_size = -16384; \
             CREATE TABLE t (k INTEGER PRIMARY KEY, v INTEGER NOT NULL); \
             CREATE INDEX t_by_v ON t (v);"
        ))
        .unwrap();
        let parked_before = PARKED.load(Ordering::Relaxed);
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut committed = Vec::new();
        let mut k = 0_i64;
        for round in 0..300 {
            let tx = conn.unchecked_transaction().unwrap();
            let mut rows = Vec::new();
            for _ in 0..50 {
                seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let v = (seed >> 16) as i64;
                k += 1;
                tx.execute("INSERT INTO t (k, v) VALUES (?1, ?2)", [k, v])
                    .unwrap();
                rows.push((v, k));
            }
            if round % 5 == 4 {
                tx.rollback().unwrap();
            } else {
                tx.commit().unwrap();
                committed.extend(rows);
            }
        }
        let parked = PARKED.load(Ordering::Relaxed) - parked_before;
        assert!(parked > 0, "no page was parked with {page_size}-byte pages");
        drop(conn);

        committed.sort_unstable();
        let conn = Connection::open(&path).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok", "{page_size}-byte pages");
        let mut stmt = conn.prepare("SELECT v, k FROM t ORDER BY v, k").unwrap();
        let rows: Vec<(i64, i64)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(rows.len(), 240 * 50, "{page_size}-byte pages");
        assert_eq!(rows, committed, "{page_size}-byte pages");
        println!("{page_size}-byte pages: {parked} pages parked");
    }
}
