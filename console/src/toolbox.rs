//! The console window's toolbox panel: chat with the user (also before they answer), and a
//! transcript the technician can save. Clipboard and file transfers report here too.
//!
//! Nothing of it outlives the session: the panel belongs to the session's [`crate::gui`] state
//! and goes with it.

use crate::driver::{Cmd, Update};
use eframe::egui::{self, RichText};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tandem_session::ClipFormat;

/// One chat line.
#[derive(Clone, Debug)]
pub struct ChatLine {
    /// Local time, `HH:MM`.
    pub at: String,
    /// From the user (else from the technician).
    pub user: bool,
    pub text: String,
}

/// Most chat lines kept (the oldest go).
const MAX_LINES: usize = 500;

/// The panel's state for one session.
pub struct Toolbox {
    pub open: bool,
    pub chat: Vec<ChatLine>,
    draft: String,
    /// Unread lines from the user while the panel is closed.
    pub unread: usize,
    note: Option<String>,
    /// The clipboard is shared both ways while the technician has control (the switch).
    pub share_clipboard: bool,
    clipboard: Option<arboard::Clipboard>,
    /// File transfers of this session.
    pub transfers: tandem_toolbox::TransferList,
    /// A path typed to send.
    send_path: String,
    /// The clipboard text last seen or set here: a change from it is sent.
    last_text: Option<String>,
    next_poll: Instant,
}

impl Default for Toolbox {
    fn default() -> Self {
        Toolbox {
            open: false,
            chat: Vec::new(),
            draft: String::new(),
            unread: 0,
            note: None,
            share_clipboard: true,
            clipboard: None,
            transfers: Default::default(),
            send_path: String::new(),
            last_text: None,
            next_poll: Instant::now(),
        }
    }
}

/// How often the technician's clipboard is looked at (there is no change notification that
/// works on every desktop).
const CLIPBOARD_POLL: Duration = Duration::from_millis(700);

impl Toolbox {
    fn push(&mut self, user: bool, text: String) {
        if self.chat.len() >= MAX_LINES {
            self.chat.remove(0);
        }
        self.chat.push(ChatLine {
            at: crate::clock(),
            user,
            text,
        });
    }

    fn clipboard(&mut self) -> Option<&mut arboard::Clipboard> {
        if self.clipboard.is_none() {
            match arboard::Clipboard::new() {
                Ok(c) => self.clipboard = Some(c),
                Err(e) => {
                    self.note = Some(format!("This computer's clipboard cannot be used: {e}"));
                    self.share_clipboard = false;
                }
            }
        }
        self.clipboard.as_mut()
    }

    /// While the technician has control: sends this computer's clipboard text when it changed
    /// since the session started (what was there before is not sent).
    pub fn poll_clipboard(&mut self, control: bool, send: &dyn Fn(Cmd)) {
        if !self.share_clipboard || Instant::now() < self.next_poll {
            return;
        }
        self.next_poll = Instant::now() + CLIPBOARD_POLL;
        let Some(text) = self.clipboard().and_then(|c| c.get_text().ok()) else {
            return;
        };
        match &self.last_text {
            None => self.last_text = Some(text),
            Some(last) if *last == text => {}
            Some(_) => {
                self.last_text = Some(text.clone());
                if control && !text.is_empty() && text.len() <= ClipFormat::Text.limit() {
                    send(Cmd::Clipboard(ClipFormat::Text, text.into_bytes()));
                }
            }
        }
    }

    /// Takes the updates meant for the panel; returns the others.
    pub fn update(&mut self, u: Update) -> Option<Update> {
        match u {
            Update::Clipboard(item) => {
                if !self.share_clipboard {
                    return None;
                }
                match item.format {
                    ClipFormat::Text => {
                        let text = String::from_utf8_lossy(&item.data).into_owned();
                        self.last_text = Some(text.clone());
                        if let Some(c) = self.clipboard()
                            && let Err(e) = c.set_text(text)
                        {
                            self.note =
                                Some(format!("The user's clipboard could not be set here: {e}"));
                        }
                    }
                    ClipFormat::Png => {
                        // Images are saved, not put on this clipboard (nothing here decodes them).
                        self.note = Some(match save_new("tandem-clipboard", "png", &item.data) {
                            Ok(p) => {
                                format!("The user's clipboard image was saved to {}", p.display())
                            }
                            Err(e) => format!("The user's clipboard image could not be saved: {e}"),
                        });
                    }
                }
                None
            }
            Update::Transfer(e) => {
                self.transfers.apply(&e);
                if !self.open {
                    self.open = true;
                }
                None
            }
            Update::SendProblem(why) => {
                self.note = Some(why);
                None
            }
            Update::ClipboardNotSent(why) => {
                self.note = Some(format!("Clipboard not sent: {why}."));
                None
            }
            Update::Chat { text } => {
                if !self.open {
                    self.unread += 1;
                }
                // A user asking something before answering opens the panel by itself.
                self.open = true;
                self.push(true, text);
                None
            }
            Update::ChatSent { text, delivered } => {
                if delivered {
                    self.push(false, text);
                } else {
                    self.note =
                        Some("The user's agent cannot show chat (an older version).".into());
                }
                None
            }
            u => Some(u),
        }
    }

    /// The transcript as text.
    pub fn transcript(&self) -> String {
        self.chat
            .iter()
            .map(|l| {
                format!(
                    "{} {}: {}\n",
                    l.at,
                    if l.user { "User" } else { "Technician" },
                    l.text
                )
            })
            .collect()
    }

    /// Draws the panel. Returns whether the chat box has the keyboard (keys then stay here
    /// instead of going to the remote screen).
    pub fn ui(&mut self, ui: &mut egui::Ui, send: &dyn Fn(Cmd)) -> bool {
        self.unread = 0;
        ui.heading("Chat");
        if let Some(n) = &self.note {
            ui.small(n);
        }
        let avail = ui.available_height();
        egui::ScrollArea::vertical()
            .max_height((avail - 90.0).max(80.0))
            .stick_to_bottom(true)
            .auto_shrink([false, false])
            .show(ui, |ui| {
                if self.chat.is_empty() {
                    ui.weak("Say hello: the user sees this before deciding.");
                }
                for l in &self.chat {
                    let who = if l.user { "User" } else { "You" };
                    ui.label(RichText::new(format!("{} {who}", l.at)).small().weak());
                    ui.label(&l.text);
                }
            });
        let edit = ui.add(
            egui::TextEdit::singleline(&mut self.draft)
                .hint_text("Message to the user")
                .desired_width(f32::INFINITY),
        );
        let focused = edit.has_focus();
        let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
        ui.horizontal(|ui| {
            if (ui.button("Send").clicked() || enter) && !self.draft.trim().is_empty() {
                send(Cmd::Chat(std::mem::take(&mut self.draft).trim().to_owned()));
                edit.request_focus();
            }
            if ui
                .add_enabled(!self.chat.is_empty(), egui::Button::new("Save transcript"))
                .clicked()
            {
                self.note = Some(match save_transcript(&self.transcript()) {
                    Ok(p) => format!("Saved to {}", p.display()),
                    Err(e) => format!("Could not save the transcript: {e}"),
                });
            }
        });
        ui.separator();
        ui.label(RichText::new("Files").strong());
        ui.horizontal(|ui| {
            ui.add(
                egui::TextEdit::singleline(&mut self.send_path)
                    .hint_text("File or folder (or drop on the screen)")
                    .desired_width(ui.available_width() - 50.0),
            );
            if ui.button("Send").clicked() && !self.send_path.trim().is_empty() {
                let p = std::mem::take(&mut self.send_path);
                send(Cmd::SendFiles(PathBuf::from(p.trim())));
            }
        });
        for r in self.transfers.rows.iter().rev().take(6) {
            ui.horizontal(|ui| {
                ui.label(if r.direction == tandem_toolbox::Direction::Outgoing {
                    "↑"
                } else {
                    "↓"
                });
                ui.add(
                    egui::ProgressBar::new(r.fraction)
                        .desired_width(140.0)
                        .show_percentage(),
                );
                if !r.finished && ui.small_button("Cancel").clicked() {
                    send(Cmd::CancelTransfer(r.id));
                }
            });
            ui.small(format!("{}: {}", r.name, r.line));
        }
        ui.separator();
        ui.checkbox(
            &mut self.share_clipboard,
            "Share the clipboard (text) while you have control",
        );
        focused
    }
}

/// Writes the transcript to the technician's downloads folder under a new name.
fn save_transcript(text: &str) -> std::io::Result<PathBuf> {
    save_new("tandem-chat", "txt", text.as_bytes())
}

/// Writes `data` to a new file `<stem>-<time>.<ext>` in the downloads folder (never over a file).
fn save_new(stem: &str, ext: &str, data: &[u8]) -> std::io::Result<PathBuf> {
    let dir = crate::downloads_dir();
    std::fs::create_dir_all(&dir)?;
    let stamp = chrono::Local::now().format("%Y-%m-%d_%H-%M-%S");
    let path = dir.join(format!("{stem}-{stamp}.{ext}"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    std::io::Write::write_all(&mut f, data)?;
    Ok(path)
}
