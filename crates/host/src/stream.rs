//! The screen thread: capture → change detection → H.264 at most 30 times a second, the cursor's
//! position and shape, and the monitor list, sent into the session as it goes. Works on any
//! [`Capturer`]; the backend decides where pixels come from.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tandem_input::DisplayRect;
use tandem_media::capture::{Capturer, CursorShape};
use tandem_media::{PipelineError, ScreenPipeline, Target};
use tandem_session::{ControlMsg, MAX_CURSOR_SIDE, MonitorInfo, SessionError};
use tokio::sync::mpsc;

/// What the path carries now, bits per second: the inner connection's congestion window per
/// round trip.
pub fn path_rate(inner: &quinn::Connection) -> f64 {
    let rtt = inner.rtt().as_secs_f64().max(0.001);
    inner.stats().path.cwnd as f64 * 8.0 / rtt
}

/// The video bitrate for the encoder: half of what the path carries (the rest is headroom for
/// input, control and retransmissions), between 300 kbit/s and 8 Mbit/s (more buys no visible
/// quality for screen content at 30 fps).
pub fn path_bitrate(inner: &quinn::Connection) -> u32 {
    (path_rate(inner) * 0.5).clamp(300_000.0, 8_000_000.0) as u32
}

/// Shared between the session loop and the screen thread.
pub(crate) struct ScreenCtl {
    pub(crate) stop: AtomicBool,
    /// Set with `stop`: wakes a send that waits on the path.
    stopped: tokio::sync::watch::Sender<bool>,
    pub(crate) keyframe: AtomicBool,
    /// A monitor the technician asked for (-1: none pending).
    pub(crate) select: AtomicI32,
    /// The technician's ceiling in kbit/s (0: follow the path only).
    pub(crate) max_kbps: AtomicU32,
    pub(crate) frames: AtomicU64,
    pub(crate) bytes: AtomicU64,
    /// Median capture → encoded time of recent frames.
    pub(crate) pipeline_us: AtomicU32,
}

impl ScreenCtl {
    pub(crate) fn new() -> ScreenCtl {
        ScreenCtl {
            stop: AtomicBool::new(false),
            stopped: tokio::sync::watch::Sender::new(false),
            keyframe: AtomicBool::new(false),
            select: AtomicI32::new(-1),
            max_kbps: AtomicU32::new(0),
            frames: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            pipeline_us: AtomicU32::new(0),
        }
    }

    /// Tells the screen thread to stop, also when it waits for the path to take a frame.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.stopped.send_replace(true);
    }
}

/// What the screen thread tells the session loop.
pub(crate) enum ScreenMsg {
    Control(ControlMsg),
    Display(DisplayRect),
    /// The encoder's new bitrate target (kbit/s) and whether frames are halved; `load`: the
    /// change came from the encoder's load rather than the path.
    Target {
        kbps: u32,
        halved: bool,
        load: bool,
    },
}

/// Downscales a cursor image by halving until it fits the protocol's limit.
pub fn cursor_msg(shape: &CursorShape) -> Option<ControlMsg> {
    let (mut w, mut h) = (shape.width as usize, shape.height as usize);
    if w == 0 || h == 0 || shape.rgba.len() != w * h * 4 {
        return None;
    }
    let mut rgba = shape.rgba.clone();
    let mut scale = 1u8;
    while (w > MAX_CURSOR_SIDE as usize || h > MAX_CURSOR_SIDE as usize) && scale < 8 {
        let (nw, nh) = (w.div_ceil(2), h.div_ceil(2));
        let mut out = vec![0u8; nw * nh * 4];
        for y in 0..nh {
            for x in 0..nw {
                let s = ((y * 2) * w + x * 2) * 4;
                out[(y * nw + x) * 4..][..4].copy_from_slice(&rgba[s..s + 4]);
            }
        }
        (w, h, rgba, scale) = (nw, nh, out, scale * 2);
    }
    if w > MAX_CURSOR_SIDE as usize || h > MAX_CURSOR_SIDE as usize {
        return None;
    }
    let s = scale as u32;
    Some(ControlMsg::CursorShape {
        width: w as u16,
        height: h as u16,
        hot_x: ((shape.hot_x / s) as usize).min(w - 1) as u16,
        hot_y: ((shape.hot_y / s) as usize).min(h - 1) as u16,
        scale,
        rgba,
    })
}

pub(crate) fn monitors_msg(c: &dyn Capturer, current: usize) -> (ControlMsg, Option<DisplayRect>) {
    let ms = c.monitors();
    let rect = ms.get(current).map(|m| DisplayRect {
        x: m.x as i32,
        y: m.y as i32,
        width: m.width,
        height: m.height,
    });
    let list = ms
        .iter()
        .take(tandem_session::MAX_MONITORS)
        .map(|m| MonitorInfo {
            name: m.name.chars().take(64).collect(),
            width: m.width,
            height: m.height,
            primary: m.primary,
        })
        .collect();
    (
        ControlMsg::Monitors {
            monitors: list,
            current: current.min(255) as u8,
        },
        rect,
    )
}

/// Why the screen could not be streamed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot start the screen pipeline: {0}")]
    Pipeline(#[from] PipelineError),
    #[error("cannot start the screen thread: {0}")]
    Thread(std::io::Error),
}

/// Streams `capturer`'s screen into the session until stopped: capture → change detection →
/// H.264, at most 30 frames a second, plus the cursor's position and shape and the monitor list.
/// Runs on its own thread (capture and the encoder block). A frame is sent before the next is
/// captured, so nothing queues behind a slow path: the next frame simply comes later, carrying
/// everything that changed meanwhile.
pub(crate) fn start_streaming(
    capturer: Box<dyn Capturer + Send>,
    inner: quinn::Connection,
    video: tandem_session::VideoSender,
    ctl: Arc<ScreenCtl>,
    tx: mpsc::Sender<ScreenMsg>,
) -> Result<std::thread::JoinHandle<()>, StreamError> {
    let rt = tokio::runtime::Handle::current();
    let mut pipeline = ScreenPipeline::new(
        capturer,
        Target {
            bitrate_bps: 4_000_000,
            max_fps: 30.0,
        },
    )?;
    let h = std::thread::Builder::new()
        .name("tandem-screen".into())
        .spawn(move || {
            let interval = Duration::from_millis(33);
            let mut seq = 0u64;
            let mut step_no = 0u64;
            let mut bitrate = 4_000_000u32;
            let mut monitor = 0usize;
            let mut last_cursor = None;
            let mut recent = std::collections::VecDeque::with_capacity(31);
            let mut not_before = Instant::now();
            let mut woke_by_drawing = true;
            let mut frame_due = Instant::now();
            let announce = |pipeline: &ScreenPipeline<Box<dyn Capturer + Send>>, monitor: usize| {
                let (m, rect) = monitors_msg(&*pipeline.capturer, monitor);
                let _ = tx.try_send(ScreenMsg::Control(m));
                if let Some(r) = rect {
                    let _ = tx.try_send(ScreenMsg::Display(r));
                }
            };
            announce(&pipeline, monitor);
            while !ctl.stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                step_no += 1;
                let want_monitor = ctl.select.swap(-1, Ordering::Relaxed);
                if want_monitor >= 0 {
                    match pipeline.capturer.select(want_monitor as usize) {
                        Ok(()) => {
                            monitor = want_monitor as usize;
                            pipeline.request_keyframe();
                            last_cursor = None;
                        }
                        Err(e) => tracing::warn!(error = %e, "monitor not selected"),
                    }
                    announce(&pipeline, monitor);
                }
                if step_no.is_multiple_of(15) {
                    // The encoder follows what the path carries (inner QUIC's window and RTT),
                    // below the technician's ceiling, with hysteresis so that small swings do not
                    // re-tune it.
                    let mut want = path_bitrate(&inner);
                    let cap = ctl.max_kbps.load(Ordering::Relaxed);
                    if cap > 0 {
                        want = want.min(cap.saturating_mul(1000)).max(100_000);
                    }
                    if want.abs_diff(bitrate) > bitrate / 4 {
                        bitrate = want;
                        pipeline.set_target(Target {
                            bitrate_bps: bitrate,
                            max_fps: 30.0,
                        });
                        let _ = tx.try_send(ScreenMsg::Target {
                            kbps: bitrate / 1000,
                            halved: pipeline.halved(),
                            load: false,
                        });
                    }
                }
                if ctl.keyframe.swap(false, Ordering::Relaxed) {
                    pipeline.request_keyframe();
                }
                let was_halved = pipeline.halved();
                let step = pipeline.step();
                if pipeline.halved() != was_halved {
                    let _ = tx.try_send(ScreenMsg::Target {
                        kbps: bitrate / 1000,
                        halved: pipeline.halved(),
                        load: true,
                    });
                }
                match step {
                    Ok(step) => {
                        let c = &step.cursor;
                        let pos = (c.x, c.y, c.visible);
                        if let Some(shape) = &c.shape
                            && let Some(m) = cursor_msg(shape)
                        {
                            let _ = tx.try_send(ScreenMsg::Control(m));
                        }
                        if last_cursor != Some(pos) || step.resized {
                            last_cursor = Some(pos);
                            let (w, h) = pipeline.capturer.size();
                            let _ = tx.try_send(ScreenMsg::Control(ControlMsg::Cursor {
                                x: c.x,
                                y: c.y,
                                visible: c.visible,
                                screen_w: w,
                                screen_h: h,
                            }));
                        }
                        if step.resized {
                            announce(&pipeline, monitor);
                        }
                        if let Some(frame) = step.encoded {
                            seq += 1;
                            let t = step.times;
                            if recent.len() == 31 {
                                recent.pop_front();
                            }
                            recent.push_back((t.capture + t.convert + t.encode).as_micros() as u32);
                            let mut sorted: Vec<u32> = recent.iter().copied().collect();
                            sorted.sort_unstable();
                            ctl.pipeline_us
                                .store(sorted[sorted.len() / 2], Ordering::Relaxed);
                            ctl.frames.fetch_add(1, Ordering::Relaxed);
                            ctl.bytes
                                .fetch_add(frame.data.len() as u64, Ordering::Relaxed);
                            let mut stopped = ctl.stopped.subscribe();
                            let sent = rt.block_on(async {
                                tokio::select! {
                                    r = video.send(seq, &frame.data) => Some(r),
                                    _ = stopped.wait_for(|s| *s) => None,
                                }
                            });
                            let Some(sent) = sent else { return };
                            match sent {
                                Ok(()) => {}
                                Err(SessionError::FrameTooLarge(n)) => {
                                    // Never for a screen up to 1080p (the encoder's buffer is the
                                    // raw picture's size); a larger screen's worst picture is
                                    // skipped and the stream starts again from a keyframe.
                                    // Paced below as if it had been sent, so that a
                                    // screen whose keyframes never fit is not re-encoded in a
                                    // tight loop.
                                    tracing::warn!(bytes = n, "video frame too large; skipped");
                                    seq -= 1;
                                    ctl.keyframe.store(true, Ordering::Relaxed);
                                }
                                Err(SessionError::Ended(_)) => return,
                                Err(e) => {
                                    // This frame's stream failed (the peer stopped it, or the
                                    // connection is going: then the next send says so). The
                                    // console needs a new starting point.
                                    tracing::debug!(error = %e, "video frame not sent");
                                    seq -= 1;
                                    ctl.keyframe.store(true, Ordering::Relaxed);
                                }
                            }
                            // Pace by size: the next frame waits until the path has carried
                            // most of this one (at 80 % of the path's rate), so a slow path gets
                            // fewer frames instead of a queue (changes meanwhile go into the
                            // next frame). The path's rate, not the encoder's target: the target
                            // stops at 8 Mbit/s, and pacing at 1.6 × that held a full-screen
                            // change on a fast LAN (loopback in the glass bench: 60–100 KB
                            // frames) 40–60 ms before the next frame could go.
                            let airtime = frame.data.len() as f64 * 8.0
                                / (path_rate(&inner) * 0.8).max(240_000.0);
                            // Rate control must not take that wait for a still screen.
                            pipeline.path_busy_until(
                                Instant::now() + Duration::from_secs_f64(airtime.min(10.0)),
                            );
                            // At most 30 frames a second on average, as a virtual schedule
                            // (GCRA) that lets a frame go at once when the previous one was a
                            // whole interval or more ago, with one frame of burst: a fixed
                            // "33 ms since the last capture" phase-locks badly to an application
                            // drawing at 30 fps (measured: every change then waited up to a
                            // whole frame, p50 drawn → capture 16–22 ms).
                            frame_due = frame_due.max(started) + interval;
                            not_before = (frame_due - interval)
                                .max(started + Duration::from_secs_f64(airtime.min(2.0)));
                            // The frame is on its way: now the encoder's work for the next one
                            // (after a scroll, hashing the picture it will refer to), which would
                            // otherwise come first when the next frame is drawn.
                            pipeline.prepare_next();
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "screen capture failed");
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
                // The frame rate limit (and the pacing) counts frames sent, not looks at the
                // screen: a capture that found nothing new (drawing reported while the previous
                // capture read it) must not hold back the next real change.
                // Looks that XDamage woke and that found nothing new are themselves limited to
                // one per 8 ms, so that drawing nobody sees (another monitor, the same pixels
                // repainted) cannot drive captures at its own rate. A look the 17 ms timeout
                // brought (the cursor) rests not at all: an 8 ms sleep there delayed the next
                // frame drawn meanwhile (glass bench, A/B alternated, 1080p p50: typing
                // 16.5–17.0 → 14.4–15.2 ms, dragging 17.9–19.8 → 15.4–15.9 ms).
                let rest = if woke_by_drawing {
                    Duration::from_millis(8)
                } else {
                    Duration::ZERO
                };
                let next_look = not_before.max(started + rest);
                if let Some(rest) = next_look.checked_duration_since(Instant::now()) {
                    std::thread::sleep(rest);
                }
                // Then capture as soon as something is drawn (XDamage), instead of on the next
                // tick: a keystroke is on its way ~16 ms sooner on average. Without a change the
                // screen is still looked at every ~17 ms (cursor position).
                woke_by_drawing = pipeline.capturer.wait_for_change(Duration::from_millis(17));
            }
        })
        .map_err(StreamError::Thread)?;
    Ok(h)
}

/// The running screen thread of a session: stopped when dropped, and joined by [`Self::finish`]
/// so that the capturer (a compositor session) is closed before the next session opens one.
pub(crate) struct ScreenThread {
    ctl: Arc<ScreenCtl>,
    handle: Option<std::thread::JoinHandle<()>>,
}

/// How long a session's end waits for its screen thread (one capture and one encode).
const JOIN_TIMEOUT: Duration = Duration::from_secs(3);

impl ScreenThread {
    pub(crate) fn new(ctl: Arc<ScreenCtl>, handle: Option<std::thread::JoinHandle<()>>) -> Self {
        ScreenThread { ctl, handle }
    }

    /// Stops the thread and waits (off the runtime, at most [`JOIN_TIMEOUT`]) for it to end.
    pub(crate) async fn finish(mut self) {
        self.ctl.stop();
        let Some(h) = self.handle.take() else { return };
        let join = tokio::task::spawn_blocking(move || h.join());
        match tokio::time::timeout(JOIN_TIMEOUT, join).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(_))) => tracing::warn!("the screen thread panicked"),
            Ok(Err(e)) => tracing::warn!(error = %e, "the screen thread was not joined"),
            Err(_) => tracing::warn!(
                "the screen thread did not stop within {JOIN_TIMEOUT:?}; leaving it behind"
            ),
        }
    }
}

impl Drop for ScreenThread {
    fn drop(&mut self) {
        self.ctl.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(w: u32, h: u32, hot: (u32, u32)) -> CursorShape {
        CursorShape {
            serial: 1,
            width: w,
            height: h,
            hot_x: hot.0,
            hot_y: hot.1,
            rgba: vec![255; (w * h * 4) as usize],
        }
    }

    #[test]
    fn a_small_cursor_goes_as_it_is() {
        let Some(ControlMsg::CursorShape {
            width,
            height,
            hot_x,
            hot_y,
            scale,
            rgba,
        }) = cursor_msg(&shape(24, 32, (3, 5)))
        else {
            panic!("no message");
        };
        assert_eq!((width, height, hot_x, hot_y, scale), (24, 32, 3, 5, 1));
        assert_eq!(rgba.len(), 24 * 32 * 4);
    }

    #[test]
    fn a_large_cursor_is_halved_until_it_fits_with_its_hot_spot() {
        let side = MAX_CURSOR_SIDE as u32 * 3;
        let Some(ControlMsg::CursorShape {
            width,
            height,
            hot_x,
            hot_y,
            scale,
            rgba,
        }) = cursor_msg(&shape(side, side, (side - 1, side / 2)))
        else {
            panic!("no message");
        };
        assert_eq!(scale, 4);
        assert!(width <= MAX_CURSOR_SIDE && height <= MAX_CURSOR_SIDE);
        assert_eq!(rgba.len(), width as usize * height as usize * 4);
        assert!(hot_x < width && hot_y < height);
    }

    #[test]
    fn a_malformed_or_huge_cursor_is_not_sent() {
        let mut bad = shape(8, 8, (0, 0));
        bad.rgba.pop();
        assert!(cursor_msg(&bad).is_none());
        assert!(cursor_msg(&shape(0, 8, (0, 0))).is_none());
        let huge = MAX_CURSOR_SIDE as u32 * 9;
        assert!(cursor_msg(&shape(huge, 4, (0, 0))).is_none());
    }
}
