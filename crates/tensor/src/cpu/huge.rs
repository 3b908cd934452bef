//! Zeroed buffers backed by transparent huge pages where the kernel allows it.
//!
//! Kernels that stream hundreds of MB per step (adapter pages, weights) touch a new 4 KB page
//! every 4 KB; on a VM each TLB miss is a two-level page walk. A 2 MB-aligned anonymous mapping
//! with `MADV_HUGEPAGE` gets 2 MB pages under the kernel's default THP mode (`madvise`), 512×
//! fewer misses. Where that is unavailable the buffer is plain anonymous memory (or a `Vec` if
//! even mapping fails), so callers need no fallback of their own.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use crate::storage::{Matrix, MatrixData, SharedBytes, TypedSlice};

/// Huge page size and alignment on x86-64 and most aarch64 kernels.
const HUGE_PAGE: usize = 2 << 20;

/// A fixed-length, zero-initialised slice of `T`.
pub struct HugeVec<T: bytemuck::Pod> {
    store: Store<T>,
    len: usize,
}

enum Store<T> {
    /// Anonymous mapping; the slice starts `offset` bytes in (2 MB-aligned).
    Map(memmap2::MmapMut, usize, PhantomData<T>),
    Heap(Vec<T>),
}

impl<T: bytemuck::Pod> HugeVec<T> {
    /// `len` zeroed elements; buffers of at least 2 MB ask for huge pages.
    pub fn zeroed(len: usize) -> Self {
        Self::zeroed_with(len, true)
    }

    /// `len` zeroed elements in an anonymous mapping of 4 KB pages whatever the size (the `Vec`
    /// only if mapping fails): for pools whose parts are given back one at a time with
    /// [`release`](Self::release), which a huge page would turn into a split.
    pub fn zeroed_small_pages(len: usize) -> Self {
        Self::zeroed_with(len, false)
    }

    fn zeroed_with(len: usize, huge: bool) -> Self {
        let bytes = len * std::mem::size_of::<T>();
        if !huge && bytes > 0 {
            if let Ok(map) = memmap2::MmapMut::map_anon(bytes) {
                return HugeVec {
                    store: Store::Map(map, 0, PhantomData),
                    len,
                };
            }
        }
        if huge && bytes >= HUGE_PAGE {
            let whole = bytes.next_multiple_of(HUGE_PAGE);
            if let Ok(map) = memmap2::MmapMut::map_anon(whole + HUGE_PAGE) {
                let offset = map.as_ptr().align_offset(HUGE_PAGE);
                #[cfg(target_os = "linux")]
                {
                    // Best effort: without THP the mapping simply keeps 4 KB pages. Only whole
                    // 2 MB pages of the buffer are advised: a huge page over the partial tail
                    // would make RSS count up to 2 MB of zeros per matrix (measured: 118 MB over
                    // an int8 0.5B model's 72 MLP matrices of 4.4 MB).
                    let _ = map.advise_range(memmap2::Advice::HugePage, offset, bytes / HUGE_PAGE * HUGE_PAGE);
                }
                return HugeVec {
                    store: Store::Map(map, offset, PhantomData),
                    len,
                };
            }
        }
        HugeVec {
            store: Store::Heap(vec![T::zeroed(); len]),
            len,
        }
    }
}

impl<T: bytemuck::Pod> HugeVec<T> {
    /// Whether the buffer is a huge-page-advised mapping (not the `Vec` fallback).
    pub fn is_mapped(&self) -> bool {
        matches!(self.store, Store::Map(..))
    }
}

impl<T: bytemuck::Pod> HugeVec<T> {
    /// Zeroes elements `range` and gives the memory of the whole OS pages inside it back to the
    /// system (`MADV_DONTNEED` on a private anonymous mapping: the pages read as zeros again and
    /// are committed anew on the next write). Partial pages at the ends, and a `Vec` fallback,
    /// are zero-filled in place. Returns the bytes given back.
    pub fn release(&mut self, range: std::ops::Range<usize>) -> usize {
        let size = std::mem::size_of::<T>();
        if let Store::Map(map, offset, _) = &mut self.store {
            let page = os_page_size();
            let (lo, hi) = (*offset + range.start * size, *offset + range.end * size);
            let (start, end) = (lo.next_multiple_of(page), hi / page * page);
            if start < end {
                #[cfg(unix)]
                {
                    // SAFETY: `start..end` lies inside this private anonymous mapping, which we
                    // borrow mutably, so no reference into those pages is live.
                    let rc = unsafe {
                        libc::madvise(
                            map.as_mut_ptr().add(start) as *mut libc::c_void,
                            end - start,
                            libc::MADV_DONTNEED,
                        )
                    };
                    if rc == 0 {
                        // Only the partial pages around the released span still need zeroing.
                        let (a, b) = ((start - *offset) / size, (end - *offset) / size);
                        let all: &mut [T] = &mut self[..];
                        all[range.start..a.max(range.start)].fill(T::zeroed());
                        all[b.min(range.end)..range.end].fill(T::zeroed());
                        return end - start;
                    }
                }
            }
        }
        self[range].fill(T::zeroed());
        0
    }
}

impl<T: bytemuck::Pod> HugeVec<T> {
    /// Bytes of the buffer's pages resident in memory (`mincore`); `None` for the `Vec`
    /// fallback or where it cannot be asked. For tests and gauges of what a pool holds.
    pub fn resident_bytes(&self) -> Option<usize> {
        let Store::Map(map, offset, _) = &self.store else {
            return None;
        };
        let page = os_page_size();
        let bytes = self.len * std::mem::size_of::<T>();
        let (start, end) = (*offset, (*offset + bytes).next_multiple_of(page).min(map.len()));
        if start >= end {
            return Some(0);
        }
        let mut vec = vec![0u8; (end - start).div_ceil(page)];
        #[cfg(target_os = "linux")]
        {
            // SAFETY: `start..end` is inside the mapping (page-aligned start), `vec` has one byte
            // per page of it.
            let rc = unsafe {
                libc::mincore(
                    map.as_ptr().add(start) as *mut libc::c_void,
                    end - start,
                    vec.as_mut_ptr(),
                )
            };
            if rc == 0 {
                return Some(vec.iter().filter(|&&b| b & 1 == 1).count() * page);
            }
        }
        None
    }
}

/// The element ranges of units `ids` (each `unit` elements long), adjacent ids merged into one
/// range, in ascending order.
pub fn unit_runs(ids: &[u32], unit: usize) -> Vec<std::ops::Range<usize>> {
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for id in sorted {
        let at = id as usize * unit;
        match runs.last_mut() {
            Some(r) if r.end == at => r.end = at + unit,
            _ => runs.push(at..at + unit),
        }
    }
    runs
}

/// The OS page size (4 KB where it cannot be read).
fn os_page_size() -> usize {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if n > 0 {
            return n as usize;
        }
    }
    4096
}

impl<T: bytemuck::Pod> AsRef<[T]> for HugeVec<T> {
    fn as_ref(&self) -> &[T] {
        self
    }
}

/// A weight matrix in huge-page memory when it is at least 2 MB, as it was otherwise.
///
/// Decode streams every weight once per token, so how the weights are mapped shows directly in
/// its speed: the safetensors file's page-cache mapping (4 KB pages) streams slowest, a private
/// copy faster, and a copy in 2 MB pages, with far fewer TLB misses, fastest. Once copied, the
/// file mapping's pages of the matrix are released from this process
/// ([`Matrix::release_file_pages`]), so RSS counts the weights once; they stay in the page cache
/// only as clean, reclaimable cache. Quantized matrices already live in memory of their own.
pub fn into_huge_pages(m: Matrix) -> Matrix {
    let data = match &m.data {
        MatrixData::F32(s) => huge_copy(s).map(MatrixData::F32),
        MatrixData::F16(s) => huge_copy(s).map(MatrixData::F16),
        MatrixData::BF16(s) => huge_copy(s).map(MatrixData::BF16),
        MatrixData::Quant(_) => None,
    };
    match data.and_then(|d| Matrix::new(m.rows, m.cols, d).ok()) {
        Some(copy) => {
            m.release_file_pages();
            copy
        }
        None => m,
    }
}

fn huge_copy<T: bytemuck::Pod>(s: &TypedSlice<T>) -> Option<TypedSlice<T>> {
    let bytes: &[u8] = bytemuck::cast_slice(s.as_slice());
    if bytes.len() < HUGE_PAGE {
        return None;
    }
    let mut buf = HugeVec::<u8>::zeroed(bytes.len());
    if !buf.is_mapped() {
        return None;
    }
    buf.copy_from_slice(bytes);
    let shared: SharedBytes = Arc::new(buf);
    TypedSlice::from_bytes(shared, 0, s.len()).ok()
}

impl<T: bytemuck::Pod> Deref for HugeVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.store {
            Store::Map(map, offset, _) => {
                bytemuck::cast_slice(&map[*offset..*offset + self.len * std::mem::size_of::<T>()])
            }
            Store::Heap(v) => v,
        }
    }
}

impl<T: bytemuck::Pod> DerefMut for HugeVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        let len = self.len;
        match &mut self.store {
            Store::Map(map, offset, _) => {
                bytemuck::cast_slice_mut(&mut map[*offset..*offset + len * std::mem::size_of::<T>()])
            }
            Store::Heap(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_of_2_mb_or_more_move_to_huge_pages_unchanged() {
        let (rows, cols) = (1100, 1000); // 2.2 MB of f32
        let v: Vec<f32> = (0..rows * cols).map(|i| i as f32 * 0.5).collect();
        let m = Matrix::new(rows, cols, MatrixData::F32(TypedSlice::from_vec(v.clone()))).unwrap();
        let moved = into_huge_pages(m);
        let MatrixData::F32(s) = &moved.data else {
            panic!("dtype changed")
        };
        assert_eq!(s.as_slice(), &v[..]);
        assert_eq!(s.as_ptr() as usize % HUGE_PAGE, 0, "copied into a 2 MB-aligned mapping");
        // Below 2 MB the matrix is left where it is.
        let small = Matrix::new(2, 3, MatrixData::F32(TypedSlice::from_vec(vec![1.0; 6]))).unwrap();
        let before = small.to_f32_vec();
        let kept = into_huge_pages(small);
        assert_eq!(kept.to_f32_vec(), before);
    }

    #[test]
    fn the_cpu_backend_copies_large_weights_unless_told_to_keep_them_mapped() {
        use crate::backend::Backend;
        use crate::cpu::CpuBackend;
        let big = || {
            Matrix::new(
                1100,
                1000,
                MatrixData::F32(TypedSlice::from_vec(vec![0.25f32; 1_100_000])),
            )
            .unwrap()
        };
        let ptr = |m: &Matrix| match &m.data {
            MatrixData::F32(s) => s.as_ptr() as usize,
            _ => unreachable!("f32 above"),
        };
        let m = big();
        let at = ptr(&m);
        let kept = CpuBackend::default().keep_weights_mapped().upload_weight(m).unwrap();
        assert_eq!(ptr(&kept), at, "kept where it was");
        let moved = CpuBackend::default().upload_weight(big()).unwrap();
        assert_eq!(ptr(&moved) % HUGE_PAGE, 0, "copied into huge pages by default");
    }

    /// A read-only file mapping, as the model's weight store makes one.
    struct FileMap(memmap2::Mmap);
    impl AsRef<[u8]> for FileMap {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }

    /// How many of the 4 KB pages of `bytes` are mapped into this process (`/proc/self/pagemap`
    /// bit 63, readable without privileges), or `None` where pagemap is unavailable.
    #[cfg(target_os = "linux")]
    fn resident_pages(bytes: &[u8]) -> Option<usize> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open("/proc/self/pagemap").ok()?;
        let (first, last) = (
            bytes.as_ptr() as usize / 4096,
            (bytes.as_ptr() as usize + bytes.len() - 1) / 4096,
        );
        f.seek(SeekFrom::Start(first as u64 * 8)).ok()?;
        let mut entries = vec![0u8; (last - first + 1) * 8];
        f.read_exact(&mut entries).ok()?;
        Some(
            entries
                .chunks_exact(8)
                .filter(|e| u64::from_ne_bytes((*e).try_into().unwrap_or([0; 8])) >> 63 == 1)
                .count(),
        )
    }

    /// Issue #21: after the copy into huge pages, the file mapping's pages of the matrix are no
    /// longer mapped into the process (RSS counts the weights once), and the original view still
    /// reads the same values (its pages fault back in from the file).
    #[cfg(target_os = "linux")]
    #[test]
    fn copying_a_mapped_matrix_releases_its_file_pages() {
        let (rows, cols) = (1024, 1024); // 4 MiB of f32 after a 4 KiB header
        let values: Vec<f32> = (0..rows * cols).map(|i| (i % 1000) as f32 * 0.25).collect();
        let path = std::env::temp_dir().join(format!("quiver-release-{}.bin", std::process::id()));
        let mut bytes = vec![7u8; 4096];
        bytes.extend(values.iter().flat_map(|v| v.to_ne_bytes()));
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: the file is ours and is not modified while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        std::fs::remove_file(&path).unwrap();
        let shared: SharedBytes = Arc::new(FileMap(map));
        let slice = TypedSlice::<f32>::from_file_bytes(shared.clone(), 4096, rows * cols).unwrap();
        let region: &[u8] = bytemuck::cast_slice(slice.as_slice());
        let pages = region.len() / 4096;
        assert_eq!(slice.as_slice(), &values[..], "read through the mapping");
        let Some(before) = resident_pages(region) else {
            eprintln!("no /proc/self/pagemap here; skipping the residency check");
            return;
        };
        assert_eq!(before, pages, "every page of the matrix mapped after reading it");
        let m = Matrix::new(rows, cols, MatrixData::F32(slice.clone())).unwrap();
        let copy = into_huge_pages(m);
        let after = resident_pages(region).unwrap_or(pages);
        assert_eq!(after, 0, "{after} of {pages} file pages still mapped after the copy");
        assert_eq!(copy.to_f32_vec(), values, "the copy holds the matrix");
        assert_eq!(slice.as_slice(), &values[..], "the mapping still reads the same values");
        // Slices over anything but a file mapping are never released.
        let owned = TypedSlice::<f32>::from_bytes(shared, 4096, rows * cols).unwrap();
        assert_eq!(owned.release_file_pages(), 0);
    }

    #[test]
    fn small_and_huge_buffers_are_zeroed_aligned_and_writable() {
        for len in [0usize, 5, 1 << 20, (3 << 20) + 7] {
            let mut v = HugeVec::<f32>::zeroed(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0.0));
            if len >= 1 << 20 {
                assert_eq!(
                    v.as_ptr() as usize % (2 << 20),
                    0,
                    "huge buffers start on a 2 MB boundary"
                );
            }
            v.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32));
        }
    }
}
