//! The ledger's index by product, filled by the writer in bulk, in packs.
//!
//! Every movement is a row appended to `stock_movements`. An index by product that SQLite
//! wrote with each movement cost each one a descent to a random leaf, and that leaf's page
//! in the commit: a 10-line cart spent half its time there under NORMAL, and 8 threads
//! reserved 40% fewer units a second than without it. The movements are indexed by
//! product in `ledger_packs` instead, by the writer, in bulk: once
//! [`SqliteConfig::ledger_index_batch`](super::SqliteConfig::ledger_index_batch)
//! movements have been appended past the last one indexed (`ledger_indexed.upto`), the
//! writer reads them, a slice after each commit, sorts them by product, size, time and
//! id (each slice as it is read, merged with the slices before it a step at a time),
//! inserts them a chunk per short transaction after each commit, and moves `upto` with
//! the last chunk. Every step is short, because the callers queued behind it wait. Each
//! slice and chunk is at least [`READ_SLICE`] or [`CHUNK`] entries, and at least twice
//! the movements the commit before it appended, so the catch-up always outpaces the
//! ledger (a first version with fixed steps fell behind 500-line carts, and its backlog
//! grew for as long as they came).
//!
//! A chunk goes in as packs: one row of `ledger_packs` for up to [`PACK`] movements of
//! one product and size that sort next to each other, holding their times and ids, keyed
//! by product, first entry and the catch-up's number, the span to its last time beside.
//! One row insert for many movements: an entry of one row each (until version 7) took
//! about twice the writer's instructions of a packed one, read and sort included.
//!
//! Reads take the movements up to `upto` from the packs and scan the ones after it, so
//! they are right whatever the index has caught up with. A catch-up cut short by a crash
//! leaves packs with entries past `upto`: reads skip those entries until `upto` covers
//! them, and by then the next catch-up has packed them again. Two processes may catch
//! up at once too (`upto` only moves forward). So a movement may be in two packs, and
//! reads drop the second.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::OnceLock;

use rusqlite::ToSql;

use crate::error::{Error, Result};

use super::BACKEND;
use super::prepared::PreparedConn;

/// The fewest index entries one catch-up transaction inserts (more after a commit that
/// appended more than half as many movements). A chunk of 512 held the group behind it
/// for about 0.2 ms; [`READ_SLICE`] says why steps are this small.
const CHUNK: usize = 128;

/// The fewest movements the writer reads, after one commit, for the catch-up to come.
/// Each step holds the writer, and the callers queued behind it: reading a whole batch
/// at once took several milliseconds, a slice of 4,096 took 1.3–1.9 ms (and set the
/// p99.9 of 8 threads on one hot product under FULL, about 2 ms), a slice of 512 about
/// 0.2 ms. Steps of 512, though, still delayed more than 1% of the groups: the same
/// load's p99 under NORMAL was 0.20–0.26 ms, against 0.12–0.17 ms with steps of 4,096.
/// Slices and chunks of 128 spread the work thinner: p99 0.13–0.15 ms, p99.9 0.24–0.33
/// ms (0.46–0.63 with 512), for about 0.75% more instructions a reservation, the fixed
/// cost of each step.
const READ_SLICE: usize = 128;

/// How many commits the writer lets pass between two looks at how far the ledger has
/// run ahead of its index (at most; fewer with a smaller batch), except right after a
/// catch-up.
const LOOK_EVERY: u64 = 16;

/// The most entries one pack holds. The first is in the row's key and the others take
/// [`ENTRY_BYTES`] each: a full pack's row is about 800 bytes, which SQLite keeps as
/// about 100 bytes on the leaf (the key included) and the rest on one overflow page of
/// 1 KiB.
const PACK: usize = 48;

/// The longest time, in microseconds, between the first and the last entry of a pack
/// (a second). A read of the movements after a time `t` looks at the packs that begin
/// after `t` minus this, and no further back.
pub(crate) const PACK_SPAN: i64 = 1_000_000;

/// Bytes of one entry in a pack: the movement's time and id, little-endian.
const ENTRY_BYTES: usize = 16;

/// The insert of one pack.
const INSERT_PACK: &str = "INSERT INTO ledger_packs \
    (product_id, first_at, first_id, catch_up, span, size, entries) VALUES (?, ?, ?, ?, ?, ?, ?)";

/// The values of one pack in [`INSERT_PACK`].
const ONE_PACK: &str = "(?, ?, ?, ?, ?, ?, ?)";

/// Packs per `INSERT` statement: one statement step for many rows (the rest of a chunk
/// goes a row at a time). Over 100,000 products most packs hold one movement, and a
/// statement for each cost a catch-up 41% more instructions than one row per movement
/// in version 6, which inserted 32 rows a statement.
const PACKS_PER_INSERT: usize = 16;

/// Index entries to pack: each movement's product, size, time and id.
#[derive(Debug, Default)]
pub(crate) struct Entries {
    /// Product, the size's place in `sizes`, time, id.
    list: Vec<(i64, usize, i64, i64)>,
    /// Each size once, and its place: one string for many entries, and entries that
    /// compare as integers when they are sorted.
    sizes: Vec<String>,
    places: HashMap<String, usize>,
    /// Where each sorted run of `list` ends, in order (see [`Entries::sort_new`]).
    runs: Vec<usize>,
}

impl Entries {
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// Adds the entry of a row that selects a movement's `product_id, size, at, id`.
    pub(crate) fn push_row(&mut self, row: &rusqlite::Row<'_>) -> rusqlite::Result<()> {
        let size = row.get_ref(1)?.as_str()?;
        // Most rows have the size of the row before them ("" for every product without
        // sizes): that one is compared before any is hashed.
        let last = self.list.last().map(|entry| entry.1);
        let known = last
            .filter(|&place| self.sizes[place] == size)
            .or_else(|| self.places.get(size).copied());
        let place = match known {
            Some(place) => place,
            None => {
                self.sizes.push(size.to_owned());
                self.places.insert(size.to_owned(), self.sizes.len() - 1);
                self.sizes.len() - 1
            }
        };
        self.list
            .push((row.get(0)?, place, row.get(2)?, row.get(3)?));
        Ok(())
    }

    /// Sorts the entries by product, size, time and id: packs are cut from runs of one
    /// product and size.
    pub(crate) fn sort(&mut self) {
        self.merge_runs(true);
    }

    /// Sorts the entries pushed since the last sort, and merges them with the ones
    /// before them only while the sorted run before is no longer than theirs: so runs
    /// halve in length towards the end, and there are at most about log2 of them. A
    /// catch-up sorts each slice it reads this way, in the step that read it, and
    /// [`sort`](Self::sort) then has little left to merge: sorting a whole batch of
    /// 16,384 entries at once held the writer for 0.6–1.9 ms (loadgen, 8 threads on one
    /// hot product under FULL), and the callers queued behind it.
    pub(crate) fn sort_new(&mut self) {
        self.merge_runs(false);
    }

    fn merge_runs(&mut self, all: bool) {
        let start = self.runs.last().copied().unwrap_or(0);
        if start < self.list.len() {
            self.list[start..].sort_unstable();
            self.runs.push(self.list.len());
        }
        while let [.., earlier, later] = self.runs[..] {
            let from = self.runs.len().checked_sub(3).map_or(0, |i| self.runs[i]);
            if !all && earlier - from > later - earlier {
                break;
            }
            // Two sorted runs side by side, which the standard library's stable sort
            // merges in one pass.
            self.list[from..].sort();
            self.runs.remove(self.runs.len() - 2);
        }
    }

    /// Inserts the entries in `range` of the sorted list as packs of the catch-up
    /// numbered `catch_up` (see [`catch_up_id`]): runs of one product and size, at most
    /// [`PACK`] entries and [`PACK_SPAN`] each, as [`unpack`] reads them. `insert` runs
    /// a statement ([`INSERT_PACK`] or [`insert_many`]) with its parameters.
    pub(crate) fn insert_packs<E>(
        &self,
        range: Range<usize>,
        catch_up: i64,
        mut insert: impl FnMut(&'static str, &[&dyn ToSql]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let mut rows = Vec::with_capacity(PACKS_PER_INSERT);
        let mut bytes = Vec::with_capacity(PACKS_PER_INSERT * PACK * ENTRY_BYTES);
        let entries = &self.list[range];
        let mut start = 0;
        while start < entries.len() {
            // A run is sorted by time: a pack's first entry is its earliest, and its last
            // its latest.
            let (product, size, first_at, first_id) = entries[start];
            let len = entries[start..]
                .iter()
                .take(PACK)
                .position(|e| {
                    (e.0, e.1) != (product, size) || e.2.saturating_sub(first_at) > PACK_SPAN
                })
                .unwrap_or(PACK.min(entries.len() - start));
            let pack = &entries[start..start + len];
            start += len;
            let from = bytes.len();
            for (_, _, at, id) in &pack[1..] {
                bytes.extend_from_slice(&at.to_le_bytes());
                bytes.extend_from_slice(&id.to_le_bytes());
            }
            let span = pack[len - 1].2 - first_at;
            rows.push(PackRow {
                numbers: [product, first_at, first_id, catch_up, span],
                size,
                bytes: from..bytes.len(),
            });
            if rows.len() == PACKS_PER_INSERT {
                self.insert_rows(insert_many(), &rows, &bytes, &mut insert)?;
                rows.clear();
                bytes.clear();
            }
        }
        for row in &rows {
            self.insert_rows(INSERT_PACK, std::slice::from_ref(row), &bytes, &mut insert)?;
        }
        Ok(())
    }

    /// Runs `sql`, an insert of as many packs as `rows` holds, their entries in `bytes`.
    fn insert_rows<E>(
        &self,
        sql: &'static str,
        rows: &[PackRow],
        bytes: &[u8],
        insert: &mut impl FnMut(&'static str, &[&dyn ToSql]) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let entries: Vec<&[u8]> = rows.iter().map(|row| &bytes[row.bytes.clone()]).collect();
        let mut params: Vec<&dyn ToSql> = Vec::with_capacity(rows.len() * 7);
        for (row, entries) in rows.iter().zip(&entries) {
            params.extend(row.numbers.iter().map(|n| n as &dyn ToSql));
            params.push(&self.sizes[row.size]);
            params.push(entries);
        }
        insert(sql, &params)
    }
}

/// One pack's values, as [`INSERT_PACK`] takes them: product, first time, first id,
/// catch-up number and span; the size's place; where its entries are in the bytes of
/// the packs to insert.
struct PackRow {
    numbers: [i64; 5],
    size: usize,
    bytes: Range<usize>,
}

/// [`INSERT_PACK`] for [`PACKS_PER_INSERT`] packs, built once.
fn insert_many() -> &'static str {
    static SQL: OnceLock<String> = OnceLock::new();
    SQL.get_or_init(|| {
        let values = vec![ONE_PACK; PACKS_PER_INSERT].join(", ");
        INSERT_PACK.replace(ONE_PACK, &values)
    })
}

/// The writer's side of the index by product: what it still has to insert.
#[derive(Debug)]
pub(crate) struct LedgerIndexer {
    /// How many movements past `upto` start a catch-up.
    batch: i64,
    look_every: u64,
    commits: u64,
    /// The entries of the catch-up in progress, sorted a slice at a time as they are
    /// read and wholly once all are; `next` is the first not inserted.
    pending: Entries,
    next: usize,
    /// The last movement id the catch-up in progress covers, and the last one read.
    target: i64,
    read: i64,
    /// The last movement id at the writer's last step of the catch-up.
    last: i64,
    /// The catch-up's number in the key of its packs (see [`catch_up_id`]).
    catch_up: i64,
}

impl LedgerIndexer {
    pub(crate) fn new(batch: u64) -> Self {
        let batch = batch.max(1);
        LedgerIndexer {
            batch: i64::try_from(batch).unwrap_or(i64::MAX),
            look_every: batch.min(LOOK_EVERY),
            commits: 0,
            pending: Entries::default(),
            next: 0,
            target: 0,
            read: 0,
            last: 0,
            catch_up: 0,
        }
    }

    /// Called by the writer after a commit, outside any transaction: inserts the next
    /// chunk of a catch-up in progress, or now and then looks whether one is due. A
    /// failure is logged and the catch-up starts over later; reads stay right meanwhile.
    pub(crate) fn after_commit(&mut self, conn: &PreparedConn) {
        if let Err(e) = self.step(conn) {
            let _ = conn.exec("ROLLBACK");
            self.clear();
            self.read = self.target;
            log::warn!("sqlite: indexing the ledger by product failed, will retry: {e}");
        }
    }

    fn step(&mut self, conn: &PreparedConn) -> Result<()> {
        let catching_up = self.read < self.target || self.next < self.pending.len();
        if catching_up {
            // Outpace the ledger: twice what the last commit appended, at least.
            let (_, last) = ends(conn)?;
            let appended = usize::try_from(last - self.last).unwrap_or(0);
            self.last = last;
            return if self.read < self.target {
                self.read_slice(conn, READ_SLICE.max(2 * appended))
            } else {
                self.insert_chunk(conn, CHUNK.max(2 * appended))
            };
        }
        self.commits += 1;
        if self.commits % self.look_every != 0 {
            return Ok(());
        }
        let (upto, last) = ends(conn)?;
        if last - upto < self.batch {
            return Ok(());
        }
        // At most four batches at once, which bounds the memory a backlog can take.
        self.catch_up = catch_up_id()?;
        self.target = last.min(upto.saturating_add(self.batch.saturating_mul(4)));
        self.read = upto;
        self.last = last;
        self.clear();
        log::debug!(
            "sqlite: indexing ledger movements {} to {} by product",
            upto + 1,
            self.target
        );
        self.read_slice(conn, READ_SLICE)
    }

    /// Reads the next `size` movements to index; once all are read, sorts them.
    fn read_slice(&mut self, conn: &PreparedConn, size: usize) -> Result<()> {
        let to = self.target.min(
            self.read
                .saturating_add(i64::try_from(size).unwrap_or(i64::MAX)),
        );
        let pending = &mut self.pending;
        conn.with(
            "SELECT product_id, size, at, id FROM stock_movements WHERE id > ?1 AND id <= ?2",
            |select| {
                let mut rows = select.query([self.read, to])?;
                while let Some(row) = rows.next()? {
                    pending.push_row(row)?;
                }
                Ok(())
            },
        )?;
        self.read = to;
        if to == self.target {
            self.pending.sort();
        } else {
            self.pending.sort_new();
        }
        Ok(())
    }

    /// Inserts the next `size` pending entries in one transaction; the last chunk moves
    /// `upto` too.
    fn insert_chunk(&mut self, conn: &PreparedConn, size: usize) -> Result<()> {
        let end = (self.next + size).min(self.pending.len());
        conn.exec("BEGIN IMMEDIATE")?;
        self.pending
            .insert_packs(self.next..end, self.catch_up, |sql, params| {
                conn.with(sql, |insert| insert.execute(params).map(drop))
            })?;
        let done = end == self.pending.len();
        if done {
            conn.with("UPDATE ledger_indexed SET upto = max(upto, ?1)", |update| {
                update.execute([self.target])
            })?;
        }
        conn.exec("COMMIT")?;
        self.next = end;
        if done {
            self.clear();
            // Look again at the next commit: what came during this catch-up may make
            // another batch already.
            self.commits = self.look_every - 1;
        }
        Ok(())
    }

    /// Forgets the entries of a catch-up, and the memory they took.
    fn clear(&mut self) {
        self.pending = Entries::default();
        self.next = 0;
    }
}

/// The (time, id) entries of the pack whose `first_at, first_id, entries` are the columns
/// from `idx` of `row`, in the order [`Entries::insert_packs`] wrote them; an error if
/// they are not a whole number of entries.
pub(crate) fn unpack<'r>(
    row: &'r rusqlite::Row<'_>,
    idx: usize,
) -> rusqlite::Result<impl Iterator<Item = (i64, i64)> + 'r> {
    let first = (row.get(idx)?, row.get(idx + 1)?);
    let bytes = row.get_ref(idx + 2)?.as_blob()?;
    if bytes.len() % ENTRY_BYTES != 0 {
        return Err(rusqlite::Error::FromSqlConversionFailure(
            idx + 2,
            rusqlite::types::Type::Blob,
            format!("a ledger pack of {} bytes is damaged", bytes.len()).into(),
        ));
    }
    let rest = bytes.chunks_exact(ENTRY_BYTES).map(|entry| {
        let (at, id) = entry.split_at(ENTRY_BYTES / 2);
        (i64_le(at), i64_le(id))
    });
    Ok(std::iter::once(first).chain(rest))
}

fn i64_le(bytes: &[u8]) -> i64 {
    let mut le = [0; 8];
    le.copy_from_slice(bytes);
    i64::from_le_bytes(le)
}

/// A random number for the key of a catch-up's packs, so that packs of two catch-ups
/// that cover the same movements (one cut short by a crash and the next, or two
/// processes' at once) do not share a key; reads drop the movements they both hold.
/// Three random bytes: a pack's row stays about as small as one entry's was, and the
/// rare pair of catch-ups that draw the same number and begin a pack at the same movement
/// make the second one's insert fail, which only starts it over.
pub(crate) fn catch_up_id() -> Result<i64> {
    let mut bytes = [0; 4];
    getrandom::fill(&mut bytes[..3]).map_err(|e| Error::storage(BACKEND, e.to_string()))?;
    Ok(i64::from(u32::from_le_bytes(bytes)))
}

/// `ledger_indexed.upto` and the last movement id: each a descent along the right edge of
/// a b-tree.
fn ends(conn: &PreparedConn) -> Result<(i64, i64)> {
    conn.with(
        "SELECT (SELECT upto FROM ledger_indexed), \
         (SELECT coalesce(max(id), 0) FROM stock_movements)",
        |s| s.query_row([], |r| Ok((r.get(0)?, r.get(1)?))),
    )
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;

    /// The packs of `movements` (product, size, time, id), as the rows of `ledger_packs`
    /// by product, size and time, each pack's entries unpacked.
    #[allow(clippy::type_complexity)]
    fn packed(
        movements: &[(i64, &str, i64, i64)],
    ) -> Vec<(i64, String, (i64, i64), i64, Vec<(i64, i64)>)> {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        let mut entries = Entries::default();
        let mut select = conn.prepare("SELECT ?1, ?2, ?3, ?4").unwrap();
        for (product, size, at, id) in movements {
            let mut rows = select
                .query(rusqlite::params![product, size, at, id])
                .unwrap();
            entries.push_row(rows.next().unwrap().unwrap()).unwrap();
        }
        entries.sort();
        entries
            .insert_packs(0..entries.len(), 1, |sql, params| {
                conn.prepare_cached(sql)?.execute(params).map(drop)
            })
            .unwrap();
        let mut packs = conn
            .prepare(
                "SELECT product_id, size, first_at + span, first_at, first_id, entries \
                 FROM ledger_packs ORDER BY product_id, size, first_at",
            )
            .unwrap();
        let mut rows = packs.query([]).unwrap();
        let mut found = Vec::new();
        while let Some(row) = rows.next().unwrap() {
            found.push((
                row.get(0).unwrap(),
                row.get(1).unwrap(),
                (row.get(3).unwrap(), row.get(4).unwrap()),
                row.get(2).unwrap(),
                unpack(row, 3).unwrap().collect(),
            ));
        }
        found
    }

    #[test]
    fn a_pack_holds_one_product_and_size_at_most_48_entries_and_a_second() {
        // 100 movements of one product a microsecond apart, 3 of its size M, and 3 of
        // another product: the third just past the longest span from the first.
        let mut movements = Vec::new();
        for i in 0..100 {
            movements.push((1, "", 1_000 + i, 10 + i));
        }
        movements.extend([(1, "M", 5, 3), (1, "M", 5, 2), (1, "M", 4, 7)]);
        movements.extend([
            (2, "", 0, 1),
            (2, "", PACK_SPAN, 8),
            (2, "", PACK_SPAN + 1, 9),
        ]);
        // Read in no particular order, as a catch-up reads them by id.
        movements.reverse();
        let packs = packed(&movements);
        let entries = |from: i64, n: i64| {
            (from..from + n)
                .map(|i| (1_000 + i, 10 + i))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            packs,
            [
                (1, String::new(), (1_000, 10), 1_047, entries(0, 48)),
                (1, String::new(), (1_048, 58), 1_095, entries(48, 48)),
                (1, String::new(), (1_096, 106), 1_099, entries(96, 4)),
                (1, "M".to_string(), (4, 7), 5, vec![(4, 7), (5, 2), (5, 3)]),
                (
                    2,
                    String::new(),
                    (0, 1),
                    PACK_SPAN,
                    vec![(0, 1), (PACK_SPAN, 8)]
                ),
                (
                    2,
                    String::new(),
                    (PACK_SPAN + 1, 9),
                    PACK_SPAN + 1,
                    vec![(PACK_SPAN + 1, 9)]
                ),
            ]
        );
    }

    proptest::proptest! {
        /// Slices sorted as a catch-up reads them end as the one sorted list a whole sort
        /// gives, and in between each run is sorted and longer than the one after it.
        #[test]
        fn slices_sorted_as_they_are_read_merge_into_one_sorted_list(
            slices in proptest::collection::vec(
                proptest::collection::vec((0i64..4, 0usize..3, 0i64..50, 0i64..1_000), 0..70),
                0..40,
            ),
        ) {
            let mut entries = Entries::default();
            for slice in &slices {
                entries.list.extend(slice);
                entries.sort_new();
                let mut from = 0;
                let mut before = usize::MAX;
                for &end in &entries.runs {
                    let run = &entries.list[from..end];
                    proptest::prop_assert!(run.is_sorted(), "run {from}..{end} unsorted");
                    proptest::prop_assert!(run.len() < before, "runs {:?}", entries.runs);
                    (from, before) = (end, run.len());
                }
                proptest::prop_assert_eq!(from, entries.list.len());
            }
            entries.sort();
            let mut all: Vec<_> = slices.concat();
            all.sort_unstable();
            let whole = if all.is_empty() { vec![] } else { vec![all.len()] };
            proptest::prop_assert_eq!(&entries.runs, &whole);
            proptest::prop_assert_eq!(entries.list, all);
        }
    }

    #[test]
    fn packs_go_in_16_a_statement_and_the_rest_one_at_a_time() {
        // 37 products of one or two movements: two statements of 16 packs, then 5.
        let movements: Vec<(i64, &str, i64, i64)> = (0..37)
            .flat_map(|p| (0..=p % 2).map(move |i| (100 + p, "", 7 * p + i, 2 * p + i)))
            .collect();
        let expected: Vec<_> = (0..37)
            .map(|p| {
                let entries: Vec<_> = (0..=p % 2).map(|i| (7 * p + i, 2 * p + i)).collect();
                let last = entries[entries.len() - 1].0;
                (100 + p, String::new(), entries[0], last, entries)
            })
            .collect();
        assert_eq!(packed(&movements), expected);
    }

    #[test]
    fn a_pack_that_is_not_whole_entries_is_an_error() {
        let conn = Connection::open_in_memory().unwrap();
        let err = conn
            .query_row(
                "SELECT 1, 2, x'0102030405060708090a0b0c0d0e0f1011'",
                [],
                |r| unpack(r, 0).map(|entries| entries.count()),
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("a ledger pack of 17 bytes is damaged"),
            "{err}"
        );
    }
}
