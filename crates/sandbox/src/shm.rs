//! The picture memory: a memfd the console creates at its full size and seals, so the child can
//! neither grow it (memory the address-space limit would not count) nor shrink it under the
//! console's reads. The child writes a picture with `pwrite`, the console reads it with `pread`
//! (why not a mapping: see the crate's documentation).

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use tandem_media::I420;

use crate::protocol::i420_len;

/// Creates the sealed picture memory of `capacity` bytes (pages are only used once written).
pub fn create(capacity: u64) -> io::Result<File> {
    use rustix::fs::{MemfdFlags, SealFlags};
    let fd = rustix::fs::memfd_create(
        "tandem-decoded-picture",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?;
    rustix::fs::ftruncate(&fd, capacity)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL)?;
    Ok(File::from(fd))
}

/// Reads the packed I420 picture `width`×`height` into `out` (the caller checked that it fits).
pub fn read_picture(shm: &File, width: u32, height: u32, out: &mut I420) -> io::Result<()> {
    let (w, h) = (width as usize, height as usize);
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    out.width = width;
    out.height = height;
    out.y.resize(w * h, 0);
    out.u.resize(cw * ch, 0);
    out.v.resize(cw * ch, 0);
    shm.read_exact_at(&mut out.y, 0)?;
    shm.read_exact_at(&mut out.u, (w * h) as u64)?;
    shm.read_exact_at(&mut out.v, (w * h + cw * ch) as u64)?;
    Ok(())
}

/// Where the child puts a decoded picture.
pub trait PictureSink {
    /// Bytes available.
    fn capacity(&self) -> u64;
    /// Writes `pic` (packed planes) at offset 0.
    fn put(&mut self, pic: &I420) -> io::Result<()>;
}

/// The child's side: the memfd it was given as a descriptor.
pub struct FdSink<F: AsFd> {
    pub fd: F,
    pub capacity: u64,
}

impl<F: AsFd> PictureSink for FdSink<F> {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn put(&mut self, pic: &I420) -> io::Result<()> {
        if i420_len(pic.width, pic.height) > self.capacity {
            return Err(io::Error::other("picture larger than the picture memory"));
        }
        let mut at = 0u64;
        for plane in [&pic.y, &pic.u, &pic.v] {
            write_all_at(&self.fd, plane, at)?;
            at += plane.len() as u64;
        }
        Ok(())
    }
}

fn write_all_at(fd: &impl AsFd, mut buf: &[u8], mut at: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match rustix::io::pwrite(fd, buf, at) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf = &buf[n..];
                at += n as u64;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A sink in memory (tests and the fuzz target).
#[derive(Debug, Default)]
pub struct MemSink {
    pub capacity: u64,
    pub bytes: Vec<u8>,
}

impl PictureSink for MemSink {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn put(&mut self, pic: &I420) -> io::Result<()> {
        if i420_len(pic.width, pic.height) > self.capacity {
            return Err(io::Error::other("picture larger than the picture memory"));
        }
        self.bytes.clear();
        for plane in [&pic.y, &pic.u, &pic.v] {
            self.bytes.extend_from_slice(plane);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_picture_goes_through_the_sealed_memory() {
        let shm = create(64).unwrap();
        let pic = I420 {
            width: 5,
            height: 3,
            y: (0..15).collect(),
            u: vec![100, 101, 102, 103, 104, 105],
            v: vec![200, 201, 202, 203, 204, 205],
        };
        let mut sink = FdSink {
            fd: shm.try_clone().unwrap(),
            capacity: 64,
        };
        sink.put(&pic).unwrap();
        let mut back = I420::default();
        read_picture(&shm, 5, 3, &mut back).unwrap();
        assert_eq!((back.y, back.u, back.v), (pic.y, pic.u, pic.v));
        // The child cannot grow the memory: the write past its end fails.
        let big = I420 {
            width: 8,
            height: 8,
            y: vec![0; 64],
            u: vec![0; 16],
            v: vec![0; 16],
        };
        assert!(sink.put(&big).is_err());
        assert!(write_all_at(&shm, &[1; 8], 60).is_err());
        assert_eq!(shm.metadata().unwrap().len(), 64);
    }
}
