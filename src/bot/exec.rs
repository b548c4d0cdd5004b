//! `--exec CMD`: your own logic, in any language, instead of the echo.
//!
//! CMD runs through `sh -c` once per message update, with the update on stdin
//! byte for byte as the platform sent it, and its key fields in the
//! environment. Its stdout is its answer, in the language `--exec-worker`
//! speaks too ([`answer`]: `{"reply":…}`, `{}`, `{"error":…}`), or plain
//! text, or a bare `{"msg_type":…,"data":{…}}` message; blank output sends
//! nothing. Exit 0 means done as answered, anything else (or running past the
//! timeout) means failed, and the update is retried. Replies carry
//! `client_msg_id` `reply_{update_id}`, so a handler that is retried after
//! its reply was sent never double-posts.
//!
//! Except 126 and 127: the shell's "found but cannot be run" and "not found".
//! They say the set-up is wrong (a script without `chmod +x`, a typo in the
//! path), so every update would fail the same way: a [`SetupError`] stops fly
//! instead of retrying forever, and the update stays for the run after the fix.

use std::fmt;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};

use super::answer::{self, Answer, Reply};
use super::child_io::{self, Chunk, ExitWatch, LogLines};
use super::{HandleError, Handler, Outcome, send_reply_step};
use crate::api::{ApiClient, MessageData, SendRequest, Update};
use crate::children::{self, Group};
use crate::observe::{Step, Steps, capped};

/// A handler's reply is one message; more than this is a bug in the handler,
/// and fails its update (never a prefix sent as the reply).
pub const MAX_REPLY_BYTES: usize = 1024 * 1024;
/// How long the handler's last stderr lines get to reach the log once it is gone.
const LOG_GRACE: Duration = Duration::from_millis(500);

pub struct ExecHandler {
    /// How the command layer names the handler in messages (the option it
    /// came from): this layer names no option itself.
    named: &'static str,
    command: String,
    timeout: Duration,
    client: ApiClient,
    /// Hand the bot token to the handler as FLY_BOT_TOKEN (off by default).
    pass_token: bool,
    /// Set by [`Handler::abandon`] when fly is exiting without waiting.
    abandoned: AtomicBool,
}

impl ExecHandler {
    pub fn new(
        named: &'static str,
        command: String,
        timeout: Duration,
        client: ApiClient,
        pass_token: bool,
    ) -> Self {
        ExecHandler {
            named,
            command,
            timeout,
            client,
            pass_token,
            abandoned: AtomicBool::new(false),
        }
    }

    fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }
}

impl Handler for ExecHandler {
    /// Kills the process group of every handler still running and starts
    /// no more: their updates fail, so they are not marked handled and get
    /// delivered again.
    fn abandon(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
        children::kill_all();
    }

    /// Only message updates run the handler.
    fn is_instant(&self, update: &Update) -> bool {
        update.message.is_none()
    }

    fn handle(&self, update: &Update, steps: &mut Steps) -> Result<Outcome, HandleError> {
        let Some(message) = update.message.as_ref() else {
            return Ok(Outcome::Ignored);
        };
        steps.note(|capture| capture.handler = Some(format!("{} {}", self.named, self.command)));
        let stdout = steps
            .time(Step::Handler, || self.run(update))
            .map_err(|error| match error.downcast::<SetupError>() {
                Ok(setup) => HandleError::Fatal(setup.into()),
                Err(error) => {
                    HandleError::Retry(error.context(format!("{} {:?}", self.named, self.command)))
                }
            })?;
        steps.note(|capture| capture.stdout = Some(capped(&stdout)));
        let who = || format!("{} {:?}", self.named, self.command);
        let answered = answer::from_output(&stdout).map_err(|why| {
            HandleError::Retry(anyhow!(
                "{}: its output is not an answer: {why}; nothing sent (an answer is {}, \
                 or plain text)",
                who(),
                answer::FORMS
            ))
        })?;
        if let Some(named) = answered
            .update_id
            .filter(|&named| named != update.update_id)
        {
            return Err(HandleError::Retry(anyhow!(
                "{} answered update {named}, but it was run for update {}; nothing sent",
                who(),
                update.update_id
            )));
        }
        settle(
            answered.answer,
            &self.client,
            update,
            message,
            steps,
            &who(),
        )
    }
}

/// Does what a handler's answer (either kind of handler) asks: nothing, a
/// reply sent, or the update failed with the handler's reason (retried).
/// `who`: the handler, as messages name it.
pub fn settle(
    answer: Answer,
    client: &ApiClient,
    update: &Update,
    message: &crate::api::Message,
    steps: &mut Steps,
    who: &str,
) -> Result<Outcome, HandleError> {
    match answer {
        Answer::Nothing => Ok(Outcome::Handled),
        Answer::Reply(reply) => send_reply(client, update, message, reply, steps),
        Answer::Error(why) => Err(HandleError::Retry(anyhow!(
            "{who} answered an error: {why}"
        ))),
    }
}

/// Sends a handler's reply to the chat `message` came from, with
/// `client_msg_id` `reply_{update_id}`: a handler that runs again for the
/// same update (a retry after the reply went out) never posts twice.
pub fn send_reply(
    client: &ApiClient,
    update: &Update,
    message: &crate::api::Message,
    reply: Reply,
    steps: &mut Steps,
) -> Result<Outcome, HandleError> {
    let Some(chat) = message.chat.as_ref() else {
        // Kept, as the echo keeps such a message: the reply had nowhere to go.
        return Err(HandleError::DeadLetter(
            "the handler replied, but the message has no chat (type and id) to reply to".into(),
        ));
    };
    let client_msg_id = steps.client_msg_id("reply", update.update_id);
    let request = match reply {
        Reply::Message { msg_type, data } => SendRequest::new(
            chat.reply_target(),
            msg_type,
            MessageData::from_fields(&data),
            client_msg_id,
        ),
        Reply::Text(text) => SendRequest::text(chat.reply_target(), text, client_msg_id),
    };
    send_reply_step(client, &request, steps, Outcome::Replied)
}

impl ExecHandler {
    /// Runs the handler for one update; returns its stdout if it exited 0 in time.
    ///
    /// No thread of its own and no sleep-and-check: the calling thread
    /// writes the update to the handler's stdin, reads its stdout and stderr
    /// and waits for its exit (a pidfd) in one poll(2) loop on nonblocking
    /// pipes, whose timeout is the deadline. So an update costs a fork and
    /// an exec, and the answer is taken the moment the handler is done.
    fn run(&self, update: &Update) -> anyhow::Result<String> {
        let update_id = update.update_id;
        let mut command = self.command_for(update);
        if self.abandoned() {
            return Err(anyhow!("not started: fly is stopping"));
        }
        let deadline = Instant::now() + self.timeout;
        let mut child = command.spawn().context("starting the handler")?;
        let mut group = Group::register(child.id()).context("registering the handler")?;
        if self.abandoned() {
            // fly began stopping between the check above and the registration.
            group.kill();
        }
        let exit = ExitWatch::new(child.id()).context("watching the handler")?;
        let mut pipes = Pipes::new(&mut child, update.raw.as_bytes(), update_id)
            .context("setting up the handler's pipes")?;

        let timed_out = !serve_until_done(&mut pipes, &exit, deadline)?;
        if timed_out || pipes.overflowed {
            group.kill();
        }
        // At once: it has exited, or has just been killed.
        let status = child.wait().context("waiting for the handler")?;
        group.leader_reaped();
        // Lines written before the handler ended still reach the log; a
        // background job that keeps stderr open is not waited for.
        pipes.log_the_rest(Instant::now() + LOG_GRACE);
        if timed_out {
            return Err(anyhow!("timed out after {:?}; killed", self.timeout));
        }
        if pipes.overflowed {
            return Err(anyhow!(
                "the handler wrote more than {} MiB to stdout (one reply's limit); killed, \
                 nothing sent",
                MAX_REPLY_BYTES / (1024 * 1024)
            ));
        }
        if self.abandoned() && !status.success() {
            tracing::warn!(
                update_id,
                "fly is stopping: handler killed, the update is not marked handled"
            );
            return Err(anyhow!("killed: fly is stopping"));
        }
        if let Some(problem) = SetupProblem::from_status(status) {
            return Err(SetupError::new(self.named, &self.command, problem).into());
        }
        if !status.success() {
            return Err(anyhow!("failed ({status})"));
        }
        String::from_utf8(pipes.reply).map_err(|_| anyhow!("its output is not UTF-8"))
    }

    /// The handler's command, with the update described in its environment.
    fn command_for(&self, update: &Update) -> std::process::Command {
        let message = update.message.as_ref();
        let chat = message.and_then(|message| message.chat.as_ref());
        let token = self.pass_token.then(|| self.client.token().expose());
        let mut command = child_io::handler_command(&self.command, token);
        command
            .env("FLY_UPDATE_ID", update.update_id.to_string())
            .env("FLY_UPDATE_TYPE", &update.kind)
            .env("FLY_CHAT_ID", chat.map_or("", |chat| chat.id.as_str()))
            .env("FLY_CHAT_TYPE", chat.map_or("", |chat| chat.kind.as_str()))
            .env(
                "FLY_MSG_TYPE",
                message.map_or("", |message| message.msg_type.as_str()),
            );
        command
    }
}

/// Serves the handler's pipes until its reply is complete or overflows;
/// `false` if the deadline came first. The reply is complete once the
/// handler exited and its stdout closed; a background job it started may
/// hold stdout open after the shell exits, so both count against the
/// timeout.
///
/// Each wait of this thread is a sleep and a wake-up that the answer
/// waits for, so it waits as few times as it can: the update is written at
/// once (an empty pipe takes it; poll(2) is asked only for what did not
/// fit), and every pipe is served after any wake-up (an exit closes stdout
/// and stderr together: the first close wakes the poll, the second needs no
/// wait of its own), then the exit: two poll(2) calls for a handler that
/// reads its update and exits, where there were four.
fn serve_until_done(
    pipes: &mut Pipes<'_>,
    exit: &ExitWatch,
    deadline: Instant,
) -> anyhow::Result<bool> {
    pipes.write_input();
    let mut exited = false;
    while !(pipes.overflowed || (exited && pipes.stdout.is_none())) {
        let mut fds = pipes.wanted();
        if !exited {
            fds.push(child_io::want(exit.fd(), libc::POLLIN));
        }
        if !child_io::wait(&mut fds, Some(deadline)).context("waiting for the handler")? {
            return Ok(false);
        }
        if !exited && fds.last().is_some_and(child_io::readable) {
            exited = true;
        }
        pipes.serve();
    }
    Ok(true)
}

/// The three pipes of a handler run, served from one thread.
struct Pipes<'a> {
    stdin: Option<ChildStdin>,
    input: &'a [u8],
    stdout: Option<ChildStdout>,
    /// Stdout, up to `MAX_REPLY_BYTES`.
    reply: Vec<u8>,
    /// Stdout went past `MAX_REPLY_BYTES`: the update fails, nothing is sent.
    overflowed: bool,
    stderr: Option<ChildStderr>,
    lines: LogLines,
    update_id: i64,
    /// For reads; small, as a reply is: a long output takes more reads.
    buffer: [u8; 8192],
}

impl<'a> Pipes<'a> {
    fn new(child: &mut Child, input: &'a [u8], update_id: i64) -> std::io::Result<Pipes<'a>> {
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        child_io::set_nonblocking(&stdin)?;
        child_io::set_nonblocking(&stdout)?;
        child_io::set_nonblocking(&stderr)?;
        Ok(Pipes {
            // An empty update (never sent, but harmless) closes stdin at once.
            stdin: (!input.is_empty()).then_some(stdin),
            input,
            stdout: Some(stdout),
            reply: Vec::new(),
            overflowed: false,
            stderr: Some(stderr),
            lines: LogLines::default(),
            update_id,
            buffer: [0; 8192],
        })
    }

    /// What to wait for: room in stdin while there is input left, output on
    /// stdout and stderr until they close.
    fn wanted(&self) -> Vec<libc::pollfd> {
        let mut fds = Vec::with_capacity(4);
        let none = -1; // poll(2) skips negative descriptors
        fds.push(child_io::want(
            self.stdin.as_ref().map_or(none, |pipe| pipe.as_raw_fd()),
            libc::POLLOUT,
        ));
        fds.push(child_io::want(
            self.stdout.as_ref().map_or(none, |pipe| pipe.as_raw_fd()),
            libc::POLLIN,
        ));
        fds.push(child_io::want(
            self.stderr.as_ref().map_or(none, |pipe| pipe.as_raw_fd()),
            libc::POLLIN,
        ));
        fds
    }

    /// Writes what fits, reads what there is and logs it, on every open
    /// pipe: a nonblocking call on a pipe that is not ready costs less than
    /// another wait for it.
    fn serve(&mut self) {
        self.write_input();
        self.read_stdout();
        self.read_stderr();
    }

    /// The update, byte for byte as the platform sent it. A handler that
    /// does not read it all (it exits, or closes stdin) ends the writing:
    /// that is its business, not a failure.
    fn write_input(&mut self) {
        let Some(stdin) = self.stdin.as_mut() else {
            return;
        };
        loop {
            match stdin.write(self.input) {
                Ok(written) => {
                    self.input = &self.input[written..];
                    if self.input.is_empty() {
                        self.stdin = None; // end of input
                        return;
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.stdin = None;
                    return;
                }
            }
        }
    }

    fn read_stdout(&mut self) {
        let Some(stdout) = self.stdout.as_mut() else {
            return;
        };
        loop {
            match child_io::read_some(stdout, &mut self.buffer) {
                Chunk::Data(read) if self.reply.len() + read > MAX_REPLY_BYTES => {
                    self.overflowed = true;
                    self.stdout = None;
                    return;
                }
                Chunk::Data(read) => self.reply.extend_from_slice(&self.buffer[..read]),
                Chunk::End => {
                    self.stdout = None;
                    return;
                }
                Chunk::Empty => return,
            }
        }
    }

    fn read_stderr(&mut self) {
        let Some(stderr) = self.stderr.as_mut() else {
            return;
        };
        let update_id = self.update_id;
        let mut log = |text: &str| {
            tracing::info!(update_id, "[exec] {text}");
            crate::observe::handler_said(update_id, text);
        };
        loop {
            match child_io::read_some(stderr, &mut self.buffer) {
                Chunk::Data(read) => self.lines.push(&self.buffer[..read], &mut log),
                Chunk::End => {
                    self.stderr = None;
                    self.lines.finish(&mut log);
                    return;
                }
                Chunk::Empty => return,
            }
        }
    }

    /// Once the handler is gone: its stderr until it closes or `deadline`.
    fn log_the_rest(&mut self, deadline: Instant) {
        self.stdin = None;
        while let Some(stderr) = self.stderr.as_ref() {
            let mut fds = [child_io::want(stderr.as_raw_fd(), libc::POLLIN)];
            match child_io::wait(&mut fds, Some(deadline)) {
                Ok(true) => self.read_stderr(),
                Ok(false) | Err(_) => break,
            }
        }
        let update_id = self.update_id;
        self.lines.end_update(&mut |text: &str| {
            tracing::info!(update_id, "[exec] {text}");
            crate::observe::handler_said(update_id, text);
        });
    }
}

/// What a handler's exit status says about the set-up rather than the update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupProblem {
    /// Exit 126: the shell found the command but could not execute it
    /// (no execute permission, a directory).
    NotExecutable,
    /// Exit 127: the shell (or the script, for a command inside it, or the
    /// kernel, for a missing `#!` interpreter) did not find a command.
    NotFound,
}

impl SetupProblem {
    /// The one place 126 and 127 are told apart from ordinary failures.
    pub fn from_status(status: ExitStatus) -> Option<SetupProblem> {
        match status.code() {
            Some(126) => Some(SetupProblem::NotExecutable),
            Some(127) => Some(SetupProblem::NotFound),
            _ => None,
        }
    }
}

/// An `--exec` handler that cannot run at all: fly stops (exit 1) with this
/// as its one error line, naming the command and the likely fix.
#[derive(Debug)]
pub struct SetupError {
    /// `--exec` or `--exec-worker`.
    flag: &'static str,
    command: String,
    problem: SetupProblem,
    /// The program the command plainly names, and what is at that path.
    program: Option<(String, Found)>,
}

/// What is at the path of the program a handler command names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    Nothing,
    Directory,
    /// A file (or anything else) without an execute bit.
    NotExecutable,
    Executable,
}

impl SetupError {
    /// Looks at the program the command names right away, from fly's working
    /// directory (the handler's too), so the hint says which fix applies.
    pub fn new(flag: &'static str, command: &str, problem: SetupProblem) -> SetupError {
        let program = program_path(command).map(|path| {
            let found = match std::fs::metadata(path) {
                Err(_) => Found::Nothing,
                Ok(meta) if meta.is_dir() => Found::Directory,
                Ok(_) if may_execute(path) => Found::Executable,
                Ok(_) => Found::NotExecutable,
            };
            (path.to_string(), found)
        });
        SetupError {
            flag,
            command: command.to_string(),
            problem,
            program,
        }
    }
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let command = &self.command;
        let flag = self.flag;
        let program = self
            .program
            .as_ref()
            .map(|(path, found)| (path.as_str(), *found));
        match (self.problem, program) {
            (SetupProblem::NotExecutable, Some((path, Found::Directory))) => write!(
                f,
                "{flag} {command:?} could not be run (exit 126): {path} is a directory"
            ),
            (SetupProblem::NotExecutable, Some((path, Found::Executable))) => write!(
                f,
                "{flag} {command:?} could not be run (exit 126): {path} is executable, so \
                 its #! interpreter or a program it runs is not: chmod +x that one"
            ),
            (SetupProblem::NotExecutable, Some((path, _))) => write!(
                f,
                "{flag} {command:?} could not be run (exit 126): is it executable? \
                 chmod +x {path}"
            ),
            (SetupProblem::NotExecutable, None) => write!(
                f,
                "{flag} {command:?} could not be run (exit 126): is it executable? \
                 chmod +x the program it runs"
            ),
            (SetupProblem::NotFound, Some((path, Found::Nothing))) => write!(
                f,
                "{flag} {command:?}: {path} not found (exit 127): check the path \
                 (a relative one starts from fly's working directory)"
            ),
            (SetupProblem::NotFound, Some((path, _))) => write!(
                f,
                "{flag} {command:?}: a command in {path}, or its #! interpreter, was not \
                 found (exit 127): check the paths it uses and PATH"
            ),
            (SetupProblem::NotFound, None) => write!(
                f,
                "{flag} {command:?}: command not found (exit 127): check the path / PATH"
            ),
        }
    }
}

impl std::error::Error for SetupError {}

/// Whether fly (and so its handler: same user, same working directory) may
/// execute `path`, as execve(2) decides it: owner, group, root, noexec mounts.
fn may_execute(path: &str) -> bool {
    let Ok(path) = std::ffi::CString::new(path) else {
        return false;
    };
    // SAFETY: access(2) reads the NUL-terminated path, which outlives the call.
    unsafe { libc::access(path.as_ptr(), libc::X_OK) == 0 }
}

/// The program a handler command starts, when it plainly is a path
/// (`./upper.sh`, `/srv/bot/run arg`): the file a fix would be about. A bare
/// name, or anything the shell would rewrite first (quotes, `$`, `VAR=x`,
/// `cd … &&`), gives `None` rather than a wrong guess.
fn program_path(command: &str) -> Option<&str> {
    let first = command.split_whitespace().next()?;
    let plain = first
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || b"/._-+,@%:".contains(&byte));
    (plain && first.contains('/')).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_126_and_127_are_set_up_problems() {
        use std::os::unix::process::ExitStatusExt;
        let exited = |code: i32| ExitStatus::from_raw(code << 8);
        assert_eq!(
            SetupProblem::from_status(exited(126)),
            Some(SetupProblem::NotExecutable)
        );
        assert_eq!(
            SetupProblem::from_status(exited(127)),
            Some(SetupProblem::NotFound)
        );
        for code in [0, 1, 2, 125, 128, 255] {
            assert_eq!(SetupProblem::from_status(exited(code)), None, "{code}");
        }
        // Killed by a signal (SIGKILL at the timeout): no exit code at all.
        assert_eq!(SetupProblem::from_status(ExitStatus::from_raw(9)), None);
    }

    #[test]
    fn the_fix_names_the_program_only_when_it_is_plainly_a_path() {
        let cases = [
            ("./upper.sh", Some("./upper.sh")),
            ("/srv/bot/run --fast", Some("/srv/bot/run")),
            ("  bin/bot.py\targ", Some("bin/bot.py")),
            ("python3 bot.py", None),
            ("upper.sh", None),
            ("cd /srv && ./run", None),
            ("\"./my bot.sh\"", None),
            ("$HOME/bot.sh", None),
            ("LANG=C ./bot.sh", None),
            ("", None),
        ];
        for (command, expected) in cases {
            assert_eq!(program_path(command), expected, "{command:?}");
        }
    }

    #[test]
    fn set_up_errors_name_the_command_and_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let message =
            |command: &str, problem| SetupError::new("--exec", command, problem).to_string();
        let dir = tempfile::tempdir().unwrap();
        let in_dir = |name: &str| dir.path().join(name).display().to_string();
        let script = |name: &str, mode: u32| {
            let path = in_dir(name);
            std::fs::write(&path, "#!/bin/sh\njq .\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let plain = script("plain.sh", 0o644);
        let runnable = script("runnable.sh", 0o755);
        let missing = in_dir("missing.sh");
        let cases = [
            (
                plain.clone(),
                SetupProblem::NotExecutable,
                format!("is it executable? chmod +x {plain}"),
            ),
            (
                runnable.clone(),
                SetupProblem::NotExecutable,
                format!("{runnable} is executable, so its #! interpreter"),
            ),
            (
                in_dir(""),
                SetupProblem::NotExecutable,
                "is a directory".to_string(),
            ),
            (
                "python3 bot.py".to_string(),
                SetupProblem::NotExecutable,
                "chmod +x the program it runs".to_string(),
            ),
            (
                missing.clone(),
                SetupProblem::NotFound,
                format!("{missing} not found (exit 127): check the path"),
            ),
            (
                runnable.clone(),
                SetupProblem::NotFound,
                format!("a command in {runnable}, or its #! interpreter"),
            ),
            (
                "no-such-handler".to_string(),
                SetupProblem::NotFound,
                "command not found (exit 127): check the path / PATH".to_string(),
            ),
        ];
        for (command, problem, expected) in cases {
            let text = message(&command, problem);
            assert!(text.starts_with(&format!("--exec {command:?}")), "{text}");
            assert!(
                text.contains(&expected),
                "{text}\nshould contain {expected}"
            );
            assert!(!text.contains('\n'), "{text}");
        }
    }
}
