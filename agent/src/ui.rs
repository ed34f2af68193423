//! The agent's window (eframe/egui): the code, the consent prompt, and while a session runs an
//! always-on-top indicator with the technician's name, what they may do, a view-only switch and End.
//!
//! The window only shows [`Shared`] state and sends [`UiCmd`]s; the session logic runs on a tokio
//! runtime beside it and never waits for the window.

use crate::{Phase, Shared, UiCmd};
use eframe::egui::{self, Color32, RichText};
use std::sync::Arc;
use std::time::Instant;
use tandem_session::Consent;
use tokio::sync::mpsc::UnboundedSender;

pub struct AgentWindow {
    shared: Arc<Shared>,
    cmds: UnboundedSender<UiCmd>,
    copied_at: Option<Instant>,
    /// The chat line being typed.
    draft: String,
    /// A path typed to send to the technician.
    send_path: String,
}

impl AgentWindow {
    pub fn new(shared: Arc<Shared>, cmds: UnboundedSender<UiCmd>) -> Self {
        AgentWindow {
            shared,
            cmds,
            copied_at: None,
            draft: String::new(),
            send_path: String::new(),
        }
    }

    fn send(&self, c: UiCmd) {
        // The logic is gone only when the program is ending anyway.
        let _ = self.cmds.send(c);
    }

    /// The clipboard's switches and the question about an image from the technician.
    fn clipboard(&mut self, ui: &mut egui::Ui) {
        let (clip, image) = {
            let v = crate::lock(&self.shared.toolbox);
            (v.clipboard, v.image_offered)
        };
        if let Some((mut to, mut from)) = clip {
            ui.horizontal(|ui| {
                let a = ui.checkbox(&mut to, "Share my clipboard with the technician");
                let b = ui.checkbox(&mut from, "Take theirs");
                if a.changed() || b.changed() {
                    self.send(UiCmd::Clipboard(to, from));
                }
            });
        }
        if let Some(bytes) = image {
            ui.horizontal(|ui| {
                ui.colored_label(
                    WARN,
                    format!(
                        "The technician sent an image ({} KB) for your clipboard.",
                        bytes / 1024
                    ),
                );
                if ui.button("Accept").clicked() {
                    self.send(UiCmd::AcceptImage(true));
                }
                if ui.button("Ignore").clicked() {
                    self.send(UiCmd::AcceptImage(false));
                }
            });
        }
    }

    /// Files: send some to the technician (a path, or files dropped on the window), and the
    /// transfers of this session with their progress.
    fn files(&mut self, ui: &mut egui::Ui) {
        for f in ui.ctx().input(|i| i.raw.dropped_files.clone()) {
            self.send(UiCmd::SendFiles(f.path().to_path_buf()));
        }
        ui.horizontal(|ui| {
            ui.add(
                egui::TextEdit::singleline(&mut self.send_path)
                    .hint_text("File or folder to send (or drop it here)")
                    .desired_width(ui.available_width() - 120.0),
            );
            if ui.button("Send to technician").clicked() && !self.send_path.trim().is_empty() {
                let p = std::mem::take(&mut self.send_path);
                self.send(UiCmd::SendFiles(std::path::PathBuf::from(p.trim())));
            }
        });
        let rows = crate::lock(&self.shared.toolbox).transfers.rows.clone();
        for r in rows.iter().rev().take(4) {
            ui.horizontal(|ui| {
                ui.label(if r.direction == tandem_toolbox::Direction::Outgoing {
                    "↑"
                } else {
                    "↓"
                });
                ui.add(
                    egui::ProgressBar::new(r.fraction)
                        .desired_width(120.0)
                        .show_percentage(),
                );
                if !r.finished && ui.small_button("Cancel").clicked() {
                    self.send(UiCmd::CancelTransfer(r.id));
                }
            });
            ui.small(&r.line);
        }
    }

    /// The chat with the technician: before the answer (to ask who they are) and during the
    /// session.
    fn chat(&mut self, ui: &mut egui::Ui) {
        ui.separator();
        ui.label(RichText::new("Chat with the technician").strong());
        let lines = crate::lock(&self.shared.toolbox).chat.clone();
        egui::ScrollArea::vertical()
            .max_height(110.0)
            .stick_to_bottom(true)
            .auto_shrink([false, true])
            .show(ui, |ui| {
                if lines.is_empty() {
                    ui.weak("No messages yet.");
                }
                for l in &lines {
                    let who = if l.technician { "Technician" } else { "You" };
                    ui.label(format!("{} {who}: {}", l.at, l.text));
                }
            });
        ui.horizontal(|ui| {
            let edit = ui.add(
                egui::TextEdit::singleline(&mut self.draft)
                    .hint_text("Type a message")
                    .desired_width(ui.available_width() - 60.0),
            );
            let enter = edit.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
            if (ui.button("Send").clicked() || enter) && !self.draft.trim().is_empty() {
                let text = std::mem::take(&mut self.draft);
                self.send(UiCmd::Chat(text.trim().to_owned()));
                edit.request_focus();
            }
        });
    }
}

pub fn options() -> eframe::NativeOptions {
    eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Tandem remote support")
            .with_inner_size([480.0, 520.0])
            .with_always_on_top(),
        renderer: eframe::Renderer::Glow,
        ..Default::default()
    }
}

const WARN: Color32 = Color32::from_rgb(0xe0, 0x8a, 0x00);
const LIVE: Color32 = Color32::from_rgb(0xc6, 0x28, 0x28);
const OK_GREEN: Color32 = Color32::from_rgb(0x2d, 0xa4, 0x4e);

impl AgentWindow {
    /// "Check connection" and its report (before and outside sessions).
    fn check(&mut self, ui: &mut egui::Ui) {
        let (available, running, report) = {
            let c = crate::lock(&self.shared.check);
            (c.opts.is_some(), c.running, c.report.clone())
        };
        if !available {
            return;
        }
        ui.add_space(8.0);
        ui.horizontal(|ui| {
            let label = if running {
                "Checking…"
            } else {
                "Check connection"
            };
            if ui.add_enabled(!running, egui::Button::new(label)).clicked() {
                self.shared.start_check();
            }
        });
        if let Some(r) = report {
            ui.label(RichText::new(&r.summary).strong().color(if r.reachable {
                OK_GREEN
            } else {
                LIVE
            }));
            ui.small("Read this line to your IT provider if they ask.");
            for st in &r.steps {
                ui.small(format!("{}  {}: {}", st.verdict, st.what, st.detail));
            }
        }
    }
}

impl eframe::App for AgentWindow {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let (phase, relay) = {
            let s = crate::lock(&self.shared.state);
            (s.phase.clone(), s.relay.clone())
        };
        if matches!(phase, Phase::Closing) {
            ui.ctx().send_viewport_cmd(egui::ViewportCommand::Close);
        }
        // Countdowns and expiry need a tick even without input.
        ui.ctx()
            .request_repaint_after(std::time::Duration::from_millis(250));
        egui::CentralPanel::default().show(ui, |ui| {
            ui.add_space(6.0);
            match &phase {
                Phase::Connecting => {
                    ui.heading("Connecting to the relay…");
                    ui.label(format!("Relay: {relay}"));
                    self.check(ui);
                }
                Phase::Waiting {
                    code,
                    expires_at,
                    note,
                } => {
                    if let Some(n) = note {
                        ui.colored_label(WARN, n);
                    }
                    ui.label("Read this code to your technician:");
                    ui.horizontal(|ui| {
                        ui.label(RichText::new(code).size(44.0).monospace().strong());
                        if ui.button("Copy").clicked() {
                            ui.ctx().copy_text(code.clone());
                            self.copied_at = Some(Instant::now());
                        }
                        if self
                            .copied_at
                            .is_some_and(|t| t.elapsed().as_secs_f32() < 2.0)
                        {
                            ui.label("copied");
                        }
                    });
                    let left = expires_at.saturating_duration_since(Instant::now());
                    ui.label(format!(
                        "Valid for {}:{:02} more; a new code follows.",
                        left.as_secs() / 60,
                        left.as_secs() % 60
                    ));
                    ui.add_space(8.0);
                    ui.colored_label(
                        WARN,
                        "Only give this code to a technician YOU contacted. Nobody legitimate \
                         calls you out of the blue and asks for it.",
                    );
                    ui.add_space(8.0);
                    ui.small(format!("Relay: {relay}"));
                    self.check(ui);
                }
                Phase::Paused { until, note } => {
                    ui.colored_label(WARN, note);
                    let left = until.saturating_duration_since(Instant::now());
                    ui.label(format!("New code in {} s.", left.as_secs() + 1));
                }
                Phase::Locked { note } => {
                    ui.heading("No code is shown");
                    ui.colored_label(LIVE, note);
                    ui.add_space(10.0);
                    if ui.button(RichText::new("New code").strong()).clicked() {
                        self.send(UiCmd::NewCode);
                    }
                }
                Phase::Joining => {
                    ui.heading("A technician is connecting…");
                }
                Phase::Online { text } => {
                    ui.heading("Managed computer");
                    ui.label(text);
                    ui.add_space(8.0);
                    ui.small(format!("Relay: {relay}"));
                }
                Phase::Consent {
                    technician,
                    organisation,
                    suspicious,
                    trust,
                    deadline,
                } => {
                    ui.heading(format!(
                        "{technician} of {organisation} wants to connect to this computer."
                    ));
                    if trust.verified {
                        ui.colored_label(egui::Color32::from_rgb(0x1a, 0x7f, 0x37), &trust.text);
                    } else {
                        ui.small(&trust.text);
                    }
                    if *suspicious {
                        ui.colored_label(LIVE, format!("Warning: {}", crate::SUSPICIOUS_NAME));
                    }
                    ui.add_space(6.0);
                    ui.colored_label(
                        WARN,
                        "Only continue if YOU contacted them. Someone who called you unexpectedly \
                         is not your technician.",
                    );
                    ui.add_space(10.0);
                    ui.horizontal(|ui| {
                        if ui.button(RichText::new("Allow control").strong()).clicked() {
                            self.send(UiCmd::Consent(Consent::AllowControl));
                        }
                        if ui.button("View only").clicked() {
                            self.send(UiCmd::Consent(Consent::ViewOnly));
                        }
                        if ui.button("Deny").clicked() {
                            self.send(UiCmd::Consent(Consent::Deny));
                        }
                    });
                    let left = deadline.saturating_duration_since(Instant::now());
                    ui.label(format!("Denied automatically in {} s.", left.as_secs()));
                }
                Phase::InSession {
                    technician,
                    organisation,
                    view_only,
                    control_possible,
                    note,
                } => {
                    ui.label(
                        RichText::new(format!(
                            "LIVE: {technician} of {organisation} can {}",
                            if *view_only {
                                "see your screen"
                            } else {
                                "see and control your screen"
                            }
                        ))
                        .color(LIVE)
                        .size(18.0)
                        .strong(),
                    );
                    if let Some(n) = note {
                        ui.colored_label(WARN, n);
                    }
                    ui.add_space(10.0);
                    if *control_possible {
                        let mut vo = *view_only;
                        if ui
                            .checkbox(&mut vo, "View only (the technician cannot click or type)")
                            .changed()
                        {
                            self.send(UiCmd::ViewOnly(vo));
                        }
                    }
                    ui.add_space(10.0);
                    if ui
                        .button(RichText::new("End session").size(18.0).strong())
                        .clicked()
                    {
                        self.send(UiCmd::End);
                    }
                    // The toolbox below the session's own controls (which keep their places).
                    ui.add_space(6.0);
                    self.clipboard(ui);
                    self.files(ui);
                }
                Phase::Ended { text } => {
                    ui.heading(text);
                    ui.label("Waiting for a new code…");
                }
                Phase::Failed { text } => {
                    ui.heading("Tandem cannot continue");
                    ui.colored_label(LIVE, text);
                    self.check(ui);
                }
                Phase::Closing => {}
            }
            if matches!(phase, Phase::Consent { .. } | Phase::InSession { .. }) {
                self.chat(ui);
            }
        });
    }
}
