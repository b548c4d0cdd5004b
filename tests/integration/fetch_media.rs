//! `fly fetch-media` against the emulator, and against a hand-rolled host for
//! what the emulator never does wrong: exact bytes to files and pipes (no
//! decompression), URLs from updates, failures named and retried only when
//! that can help, redirects checked, nothing partial left behind (not even
//! by `kill -9`, after the next fetch), flat memory.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::{
    Background, ChildLog, Emulator, TOKEN, fly, fly_at, fly_child, fly_path, media_pattern,
    stderr_of, wait_for_exit, wait_until,
};

fn register(emulator: &Emulator, url: &str, size: usize) {
    emulator.post("/_emulator/media", json!({"url": url, "size": size}));
}

fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn one_url_to_a_named_file() {
    let emulator = Emulator::start_strict();
    let url = "https://cdn.example/a/report.pdf";
    register(&emulator, url, 700_001);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.pdf");
    let output = fly_at(&emulator)
        .args(["fetch-media", url, "-o"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        target.display().to_string()
    );
    assert!(std::fs::read(&target).unwrap() == media_pattern(700_001));
    assert!(
        output.stderr.is_empty(),
        "no progress bars when stderr is not a terminal"
    );
}

#[test]
fn several_urls_into_a_directory_with_safe_unique_names() {
    let emulator = Emulator::start();
    let urls = [
        "https://cdn.example/one/photo.jpg?sig=1",
        "https://other.example/two/photo.jpg",
        "https://cdn.example/../../etc/passwd",
    ];
    for (n, url) in urls.iter().enumerate() {
        register(&emulator, url, 1000 * (n + 1));
    }
    let dir = tempfile::tempdir().unwrap();
    let output = fly_at(&emulator)
        .args(["fetch-media", "--dir"])
        .arg(dir.path())
        .args(urls)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(files_in(dir.path()), ["passwd", "photo-2.jpg", "photo.jpg"]);
    assert_eq!(
        std::fs::read(dir.path().join("photo.jpg")).unwrap(),
        media_pattern(1000)
    );
    assert_eq!(
        std::fs::read(dir.path().join("photo-2.jpg")).unwrap(),
        media_pattern(2000)
    );
    assert_eq!(
        std::fs::read(dir.path().join("passwd")).unwrap(),
        media_pattern(3000)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).lines().count(), 3);

    // Existing files are not overwritten without --force.
    let again = fly_at(&emulator)
        .args(["fetch-media", "--dir"])
        .arg(dir.path())
        .arg(urls[0])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr_of(&again).contains("already exists (use --force to overwrite)"),
        "{}",
        stderr_of(&again)
    );
    let forced = fly_at(&emulator)
        .args(["fetch-media", "--force", "--dir"])
        .arg(dir.path())
        .arg(urls[0])
        .output()
        .unwrap();
    assert!(forced.status.success());
}

#[test]
fn stdout_carries_the_bytes_alone_through_a_pipe() {
    let emulator = Emulator::start();
    let url = "https://cdn.example/voice.amr";
    let size = 2 * 1024 * 1024 + 3;
    register(&emulator, url, size);
    let script = format!(
        "{} fetch-media '{url}' -o - | sha256sum",
        fly_path().display()
    );
    let output = Command::new("sh")
        .args(["-c", &script])
        .env("FLY_BASE_URL", &emulator.base_url)
        .env("FLY_BOT_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    let expected = hex::encode(Sha256::digest(media_pattern(size)));
    assert!(String::from_utf8_lossy(&output.stdout).starts_with(&expected));
}

#[test]
fn a_reader_that_goes_away_is_a_normal_end() {
    let emulator = Emulator::start();
    let url = "https://cdn.example/big.bin";
    register(&emulator, url, 20 * 1024 * 1024);
    let script = format!(
        "{} fetch-media '{url}' -o - | head -c 10 >/dev/null; echo \"${{PIPESTATUS[0]}}\"",
        fly_path().display()
    );
    let output = Command::new("bash")
        .args(["-c", &script])
        .env("FLY_BASE_URL", &emulator.base_url)
        .env("FLY_BOT_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "0");
    assert!(output.stderr.is_empty(), "{}", stderr_of(&output));
}

#[test]
fn urls_from_image_and_video_updates_on_stdin() {
    let emulator = Emulator::start();
    let dir = tempfile::tempdir().unwrap();
    register(&emulator, "https://cdn.example/i/original.png", 5000);
    register(&emulator, "https://cdn.example/i/thumb.png", 500);
    register(&emulator, "https://cdn.example/v/clip.mp4", 9000);
    register(&emulator, "https://cdn.example/v/poster.jpg", 900);
    let image_update = json!({"update_id": 3, "type": "message", "message": {
        "chat": {"type": "private", "id": "u"}, "msgType": "image",
        "data": {"originalUrl": "https://cdn.example/i/original.png", "thumbnailUrl": "https://cdn.example/i/thumb.png"}}});
    fly_at(&emulator)
        .args(["fetch-media", "--update", "-", "--dir"])
        .arg(dir.path())
        .write_stdin(image_update.to_string())
        .assert()
        .success();
    assert_eq!(files_in(dir.path()), ["original.png", "thumb.png"]);

    let video_message = json!({"msgType": "video",
        "data": {"videoUrl": "https://cdn.example/v/clip.mp4", "thumbnailUrl": "https://cdn.example/v/poster.jpg"}});
    fly_at(&emulator)
        .args(["fetch-media", "--original-only", "--update", "-", "--dir"])
        .arg(dir.path())
        .write_stdin(video_message.to_string())
        .assert()
        .success();
    assert_eq!(
        files_in(dir.path()),
        ["clip.mp4", "original.png", "thumb.png"]
    );
    assert_eq!(
        std::fs::read(dir.path().join("clip.mp4")).unwrap(),
        media_pattern(9000)
    );
}

#[test]
fn an_unknown_url_is_exit_1_naming_it_and_the_others_still_land() {
    let emulator = Emulator::start();
    register(&emulator, "https://cdn.example/known.bin", 100);
    let dir = tempfile::tempdir().unwrap();
    let output = fly_at(&emulator)
        .args(["fetch-media", "--dir"])
        .arg(dir.path())
        .args([
            "https://cdn.example/known.bin",
            "https://cdn.example/nobody-has-this.bin",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr_of(&output);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(
            "https://cdn.example/nobody-has-this.bin: the platform returned no access URL"
        ),
        "{stderr}"
    );
    assert_eq!(files_in(dir.path()), ["known.bin"]);
}

/// A host answering as the platform does once an access URL has expired
/// (fetch-media asks for at least 1 s, so a real expiry would take a wait).
#[test]
fn an_expired_access_url_is_exit_1_and_leaves_no_file() {
    let host = MediaHost::start(|_, stream| {
        let body = br#"{"code":0,"msg":"access URL expired"}"#;
        respond(stream, "403 Forbidden", &[], body);
    });
    let dir = tempfile::tempdir().unwrap();
    let output = host.fetch(&["https://cdn.example/soon-gone.bin"], dir.path());
    assert_eq!(output.status.code(), Some(1));
    let stderr = stderr_of(&output);
    assert!(
        stderr.contains("soon-gone.bin: access URL expired or unknown (HTTP 403)"),
        "{stderr}"
    );
    assert!(files_in(dir.path()).is_empty(), "no partial or temp file");
}

/// Transfers cut half-way are resumed (Range) or restarted until complete,
/// with and without the fsync before the rename.
#[test]
fn dropped_connections_mid_body_are_recovered_byte_exact() {
    let emulator = Emulator::start();
    let size = 4 * 1024 * 1024 + 11;
    register(&emulator, "https://cdn.example/flaky.bin", size);
    emulator.faults(json!({"download_cut_rate": 0.5, "seed": 3}));
    let dir = tempfile::tempdir().unwrap();
    for round in 0..4 {
        let target = dir.path().join(format!("flaky-{round}.bin"));
        let mut fly = fly_at(&emulator);
        fly.args(["fetch-media", "https://cdn.example/flaky.bin", "-o"])
            .arg(&target);
        if round % 2 == 1 {
            fly.arg("--no-fsync");
        }
        let output = fly.output().unwrap();
        assert!(output.status.success(), "{}", stderr_of(&output));
        assert!(
            std::fs::read(&target).unwrap() == media_pattern(size),
            "round {round}"
        );
    }
    assert_eq!(files_in(dir.path()).len(), 4, "no temp files left");
}

/// Peak resident memory of `fly fetch-media` streaming 1 GiB stays under 32 MiB.
#[test]
fn memory_stays_flat_for_a_1_gib_file() {
    let emulator = Emulator::start();
    let size: usize = 1 << 30;
    register(&emulator, "https://cdn.example/huge.bin", size);
    let mut child = fly_child(&emulator.base_url)
        .args(["fetch-media", "https://cdn.example/huge.bin", "-o", "-"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _log = ChildLog::collect("fly fetch-media", &mut child);
    let mut stdout = child.stdout.take().unwrap();
    let counter =
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()).unwrap());
    // VmHWM is the peak so far: the last reading before exit is the answer.
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    while child.try_wait().unwrap().is_none() {
        if let Ok(status) = std::fs::read_to_string(&status_path)
            && let Some(line) = status.lines().find(|line| line.starts_with("VmHWM:"))
        {
            let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            peak_kib = peak_kib.max(kib);
        }
        // The sampling interval.
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(counter.join().unwrap(), size as u64);
    assert!(peak_kib > 0, "no memory reading taken");
    assert!(peak_kib < 32 * 1024, "peak RSS {peak_kib} KiB");
}

/// Ctrl-C in the middle of a download removes the temporary file: nothing
/// is left under any name, and the run ends with one line, exit 1.
#[test]
fn an_interrupted_download_leaves_no_temp_file() {
    let emulator = Emulator::start();
    // Far more than can arrive before the signal does.
    let size: usize = 64 << 30;
    register(&emulator, "https://cdn.example/endless.bin", size);
    let dir = tempfile::tempdir().unwrap();
    let mut child = fly_child(&emulator.base_url)
        .args([
            "fetch-media",
            "https://cdn.example/endless.bin",
            "--no-fsync",
            "--dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(30), "the download to start", || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .any(|entry| entry.unwrap().metadata().unwrap().len() > 1 << 20)
    });
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = wait_for_exit(&mut child, Duration::from_secs(10)).expect("stopped after SIGINT");
    let output = child.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(1));
    let stderr = stderr_of(&output);
    assert!(stderr.contains("interrupted"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        output.stdout.is_empty(),
        "no path printed for a file not saved"
    );
    assert!(
        files_in(dir.path()).is_empty(),
        "left behind: {:?}",
        files_in(dir.path())
    );
}

/// `-o` into something that is not a regular file writes into it instead of
/// replacing it; a directory is a usage error naming --dir.
#[test]
fn output_into_a_device_or_fifo_is_written_never_replaced() {
    let emulator = Emulator::start();
    register(&emulator, "https://cdn.example/s.bin", 300_000);
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    for target in [fifo.as_path(), Path::new("/dev/null")] {
        let output = fly_at(&emulator)
            .args(["fetch-media", "https://cdn.example/s.bin", "--force", "-o"])
            .arg(target)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr_of(&output));
    }
    assert!(reader.join().unwrap() == media_pattern(300_000));
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    assert!(
        std::fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device()
    );

    let output = fly_at(&emulator)
        .args(["fetch-media", "https://cdn.example/s.bin", "-o"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr_of(&output).contains("is a directory; use --dir"));
}

/// Saved files get the usual 0666-less-umask mode, not the 0600 of a
/// temporary file (a web server must be able to serve the media).
#[test]
fn saved_files_get_the_umask_mode() {
    use std::os::unix::fs::PermissionsExt;
    let emulator = Emulator::start();
    register(&emulator, "https://cdn.example/m.bin", 10);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("m.bin");
    let output = fly_at(&emulator)
        .args(["fetch-media", "https://cdn.example/m.bin", "-o"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    // SAFETY: umask only swaps an integer; read it and put it back at once.
    let umask = unsafe {
        let mask = libc::umask(0o022);
        libc::umask(mask);
        mask
    };
    let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666 & !umask, "mode {mode:o}");
}

/// One request [`MediaHost`] saw: the request line and the headers
/// (names in lower case).
struct Seen {
    line: String,
    headers: Vec<(String, String)>,
}

/// A loopback server standing in for the platform and its file host at
/// once: `batch_access` maps every media URL to an access URL on this same
/// server (`/` + the URL's last path segment), and a GET of that path is
/// answered by `answer(path, stream)` with whatever raw bytes it writes, so
/// a test can send what no library server would. Every request is recorded.
/// (Hand-rolled like `common::misbehaving_server`, for the same reason.)
struct MediaHost {
    base_url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl MediaHost {
    fn start(answer: impl Fn(&str, &mut TcpStream) + Send + Sync + 'static) -> MediaHost {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&seen);
        let answer = Arc::new(answer);
        let own_url = base_url.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (recorded, answer, own_url) =
                    (Arc::clone(&recorded), Arc::clone(&answer), own_url.clone());
                // A connection each, so a held-back answer blocks no other.
                std::thread::spawn(move || serve_one(stream, &recorded, &*answer, &own_url));
            }
        });
        MediaHost { base_url, seen }
    }

    /// How many GETs of `path` arrived.
    fn gets(&self, path: &str) -> usize {
        let request_line = format!("GET {path} ");
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|seen| seen.line.starts_with(&request_line))
            .count()
    }

    /// The request lines of every GET, in order.
    fn get_lines(&self) -> Vec<String> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|seen| seen.line.starts_with("GET "))
            .map(|seen| seen.line.clone())
            .collect()
    }

    /// The values of header `name` on the GETs of `path`.
    fn header_on_gets(&self, path: &str, name: &str) -> Vec<String> {
        let request_line = format!("GET {path} ");
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|seen| seen.line.starts_with(&request_line))
            .flat_map(|seen| seen.headers.iter())
            .filter(|(header, _)| header == name)
            .map(|(_, value)| value.clone())
            .collect()
    }

    /// `fly fetch-media URL… ARGS` against this host.
    fn fetch(&self, args: &[&str], dir: &Path) -> std::process::Output {
        fly()
            .env("FLY_BASE_URL", &self.base_url)
            .env("FLY_BOT_TOKEN", TOKEN)
            .arg("fetch-media")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap()
    }
}

fn serve_one(
    mut stream: TcpStream,
    recorded: &Mutex<Vec<Seen>>,
    answer: &(dyn Fn(&str, &mut TcpStream) + Send + Sync),
    own_url: &str,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut headers = Vec::new();
    let mut header = String::new();
    while reader.read_line(&mut header).is_ok_and(|read| read > 2) {
        if let Some((name, value)) = header.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        header.clear();
    }
    let body_length = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .map_or(0, |(_, value)| value.parse().unwrap());
    let mut body = vec![0u8; body_length];
    reader.read_exact(&mut body).unwrap();
    let line = line.trim().to_string();
    recorded.lock().unwrap().push(Seen {
        line: line.clone(),
        headers,
    });
    let path = line.split(' ').nth(1).unwrap_or_default().to_string();
    if line.starts_with("POST /api/v1/s/bot/files/batch_access ") {
        let request: Value = serde_json::from_slice(&body).unwrap();
        let mut files = serde_json::Map::new();
        for file in request["files"].as_array().unwrap() {
            let url = file["url"].as_str().unwrap();
            let name = url.rsplit('/').next().unwrap();
            files.insert(url.to_string(), json!(format!("{own_url}/{name}")));
        }
        let envelope = json!({"code": 0, "msg": "ok", "data": {"files": files}}).to_string();
        respond(&mut stream, "200 OK", &[], envelope.as_bytes());
    } else {
        answer(&path, &mut stream);
    }
}

/// Writes a whole answer: status, extra header lines, a Content-Length
/// for `body`, and `body`.
fn respond(stream: &mut TcpStream, status: &str, headers: &[&str], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\n");
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

/// Writes `raw` as it is: for answers that are not valid HTTP.
fn respond_raw(stream: &mut TcpStream, raw: &[u8]) {
    let _ = stream.write_all(raw);
}

/// The part files (`.NAME.XXXXXX.part`) in `dir`.
fn part_files_in(dir: &Path) -> Vec<String> {
    files_in(dir)
        .into_iter()
        .filter(|name| name.starts_with('.') && name.ends_with(".part"))
        .collect()
}

/// A child process killed (SIGKILL) and reaped when dropped, so a failed
/// assertion leaves no `fly` running.
/// A `.gz` served with `Content-Encoding: gzip` is saved as the bytes sent,
/// as curl saves it: no decompression, and `Accept-Encoding: identity` asks
/// the server for exactly those bytes.
#[test]
fn a_gzip_encoded_response_is_saved_byte_for_byte_as_sent() {
    let gzipped =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/greeting.txt.gz"))
            .unwrap();
    let served = gzipped.clone();
    let host = MediaHost::start(move |_, stream| {
        respond(
            stream,
            "200 OK",
            &["Content-Type: application/gzip", "Content-Encoding: gzip"],
            &served,
        );
    });
    let dir = tempfile::tempdir().unwrap();
    let output = host.fetch(
        &["https://cdn.example/m/greeting.txt.gz", "-o", "saved.gz"],
        dir.path(),
    );
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert!(
        std::fs::read(dir.path().join("saved.gz")).unwrap() == gzipped,
        "the file holds the gzip bytes as sent"
    );
    assert_eq!(
        host.header_on_gets("/greeting.txt.gz", "accept-encoding"),
        ["identity"]
    );

    // The same through stdout.
    let output = host.fetch(
        &["https://cdn.example/m/greeting.txt.gz", "-o", "-"],
        dir.path(),
    );
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert!(output.stdout == gzipped);
}

/// `kill -9` in the middle of a download leaves its hidden part file; the
/// next fetch of the same name removes it, and only it: a part file of
/// another name, or one a live process holds locked, stays.
#[test]
fn a_part_file_left_by_kill_9_is_removed_by_the_next_fetch_of_that_name() {
    let emulator = Emulator::start();
    register(&emulator, "https://cdn.example/endless.bin", 64 << 30);
    register(&emulator, "https://cdn.example/small.bin", 5000);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("media.bin");
    let killed = Background::spawn(
        "fly fetch-media",
        fly_child(&emulator.base_url)
            .args([
                "fetch-media",
                "https://cdn.example/endless.bin",
                "--no-fsync",
                "-o",
            ])
            .arg(&target)
            .stdout(Stdio::null()),
    );
    wait_until(Duration::from_secs(30), "the download to start", || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .any(|entry| entry.unwrap().metadata().unwrap().len() > 1 << 20)
    });
    drop(killed); // SIGKILL: no chance to clean up
    let left = part_files_in(dir.path());
    assert_eq!(left.len(), 1, "kill -9 leaves the part file: {left:?}");
    assert!(left[0].starts_with(".media.bin."), "{left:?}");

    // Look-alikes that must survive: another name's, and one being written.
    let other_name = dir.path().join(".media.bin.x.Ab12Cd.part");
    std::fs::write(&other_name, b"not ours").unwrap();
    let held = dir.path().join(".media.bin.Held12.part");
    let writer = std::fs::File::create(&held).unwrap();
    // SAFETY: flock only reads its integer arguments; `writer` is open.
    let locked = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&writer),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    assert_eq!(locked, 0);

    let output = fly_at(&emulator)
        .args(["fetch-media", "https://cdn.example/small.bin", "-o"])
        .arg(&target)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert!(std::fs::read(&target).unwrap() == media_pattern(5000));
    assert!(
        !dir.path().join(&left[0]).exists(),
        "the stale part file is gone"
    );
    assert!(other_name.exists(), "another name's part file stays");
    assert!(held.exists(), "a part file someone holds locked stays");
    let stderr = stderr_of(&output);
    assert!(
        stderr.contains(&left[0]) && stderr.contains("interrupted download"),
        "the removal is logged: {stderr}"
    );
    drop(writer);
}

/// Two fly processes fetching to the same name at once: the second never
/// removes the part file the first is still writing, and both succeed.
#[test]
fn a_part_file_another_fly_is_writing_is_left_alone() {
    const SIZE: usize = 2 << 20;
    let release = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let released = Arc::clone(&release);
    let host = MediaHost::start(move |path, stream| match path {
        "/slow.bin" => {
            let body = media_pattern(SIZE);
            let head =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {SIZE}\r\nConnection: close\r\n\r\n");
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body[..SIZE / 2]);
            let (lock, condvar) = &*released;
            let _guard = condvar
                .wait_while(lock.lock().unwrap(), |released| !*released)
                .unwrap();
            let _ = stream.write_all(&body[SIZE / 2..]);
        }
        _ => respond(stream, "200 OK", &[], b"quick"),
    });
    let dir = tempfile::tempdir().unwrap();
    let mut first = Background::spawn(
        "fly fetch-media (the first)",
        fly_child(&host.base_url)
            .args([
                "fetch-media",
                "https://cdn.example/slow.bin",
                "--force",
                "-o",
                "same.bin",
            ])
            .current_dir(dir.path())
            .stdout(Stdio::null()),
    );
    wait_until(Duration::from_secs(30), "half of the slow file", || {
        part_files_in(dir.path()).iter().any(|name| {
            std::fs::metadata(dir.path().join(name))
                .is_ok_and(|found| found.len() >= (SIZE / 2) as u64)
        })
    });
    let writing = part_files_in(dir.path());

    let second = host.fetch(
        &["https://cdn.example/quick.bin", "--force", "-o", "same.bin"],
        dir.path(),
    );
    assert!(second.status.success(), "{}", stderr_of(&second));
    assert_eq!(
        part_files_in(dir.path()),
        writing,
        "the live part file stays"
    );

    {
        let (lock, condvar) = &*release;
        *lock.lock().unwrap() = true;
        condvar.notify_all();
    }
    let status = wait_for_exit(&mut first.child, Duration::from_secs(30)).expect("first fly ends");
    assert!(status.success(), "the first fly still saves its file");
    assert!(std::fs::read(dir.path().join("same.bin")).unwrap() == media_pattern(SIZE));
    assert!(part_files_in(dir.path()).is_empty());
}

/// Answers that will never get better fail at the first attempt, with one
/// line naming the cause; a 503 is still retried (the control).
#[test]
fn permanent_failures_are_not_retried() {
    let busy_once = std::sync::atomic::AtomicBool::new(true);
    let host = MediaHost::start(move |path, stream| {
        match path {
        "/not-implemented.bin" => respond(stream, "501 Not Implemented", &[], b""),
        "/letters-length.bin" => respond_raw(
            stream,
            b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\nConnection: close\r\n\r\nhello",
        ),
        "/two-lengths.bin" => respond_raw(
            stream,
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello!",
        ),
        "/many-headers.bin" => {
            let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
            for n in 0..2000 {
                raw.extend_from_slice(format!("X-Header-{n}: x\r\n").as_bytes());
            }
            raw.extend_from_slice(b"Content-Length: 5\r\nConnection: close\r\n\r\nhello");
            respond_raw(stream, &raw);
        }
        "/broken-chunks.bin" => respond_raw(
            stream,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        ),
        "/busy-once.bin" if busy_once.swap(false, std::sync::atomic::Ordering::SeqCst) => {
            respond(stream, "503 Service Unavailable", &[], b"")
        }
        _ => respond(stream, "200 OK", &[], b"fine"),
    }
    });
    let dir = tempfile::tempdir().unwrap();
    let table = [
        ("not-implemented.bin", "HTTP 501"),
        ("letters-length.bin", "content-length header not a number"),
        ("two-lengths.bin", "conflicting content-length"),
        ("many-headers.bin", "too many headers"),
        ("broken-chunks.bin", "chunk length"),
    ];
    for (name, cause) in table {
        let url = format!("https://cdn.example/x/{name}");
        let output = host.fetch(&[&url], dir.path());
        assert_eq!(host.gets(&format!("/{name}")), 1, "{name} was retried");
        assert_eq!(output.status.code(), Some(1), "{name}");
        let stderr = stderr_of(&output);
        assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
        assert!(
            stderr.starts_with(&format!("fly: error: {url}: ")) && stderr.contains(cause),
            "{name}: {stderr}"
        );
    }
    assert!(
        files_in(dir.path()).is_empty(),
        "{:?}",
        files_in(dir.path())
    );

    let output = host.fetch(&["https://cdn.example/x/busy-once.bin"], dir.path());
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(host.gets("/busy-once.bin"), 2, "a 503 is retried");
    assert_eq!(
        std::fs::read(dir.path().join("busy-once.bin")).unwrap(),
        b"fine"
    );
}

/// The file host's `Retry-After` is honoured while it fits in the ~30 s a
/// one-shot command retries for, and refused at once, naming the wait,
/// when it does not.
#[test]
fn a_file_hosts_retry_after_is_honoured_within_the_budget() {
    let busy_once = std::sync::atomic::AtomicBool::new(true);
    let host = MediaHost::start(move |path, stream| match path {
        "/throttled.bin" => respond(stream, "429 Too Many Requests", &["Retry-After: 300"], b""),
        "/busy-once.bin" if busy_once.swap(false, std::sync::atomic::Ordering::SeqCst) => {
            respond(stream, "503 Service Unavailable", &["Retry-After: 1"], b"")
        }
        _ => respond(stream, "200 OK", &[], b"fine"),
    });
    let dir = tempfile::tempdir().unwrap();

    let url = "https://cdn.example/x/throttled.bin";
    let output = host.fetch(&[url], dir.path());
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "fly: error: {url}: HTTP 429; the server asked to wait 300 s (Retry-After), \
             more than the ~30 s this command retries for\n"
        )
    );
    assert_eq!(host.gets("/throttled.bin"), 1, "no retry after the refusal");
    assert!(files_in(dir.path()).is_empty());

    let output = host.fetch(&["https://cdn.example/x/busy-once.bin"], dir.path());
    let stderr = stderr_of(&output);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("retrying in 1.0s"), "{stderr}");
    assert_eq!(host.gets("/busy-once.bin"), 2);
    assert_eq!(
        std::fs::read(dir.path().join("busy-once.bin")).unwrap(),
        b"fine"
    );
}

/// A redirect to `file:` (or any scheme but http/https) is refused with the
/// URL named, instead of being fetched as a path on the same host; an http
/// redirect is still followed.
#[test]
fn a_redirect_to_a_non_http_scheme_is_refused_naming_it() {
    let host = MediaHost::start(|path, stream| match path {
        "/to-file.bin" => respond(stream, "302 Found", &["Location: file:///etc/passwd"], b""),
        "/to-ftp.bin" => respond(
            stream,
            "301 Moved Permanently",
            &["Location: ftp://files.example/x"],
            b"",
        ),
        "/to-here.bin" => respond(stream, "302 Found", &["Location: /landed.bin?sig=1"], b""),
        "/landed.bin?sig=1" => respond(stream, "200 OK", &[], b"landed"),
        _ => respond(stream, "404 Not Found", &[], b""),
    });
    let dir = tempfile::tempdir().unwrap();
    for (name, location, scheme) in [
        ("to-file.bin", "file:///etc/passwd", "file:"),
        ("to-ftp.bin", "ftp://files.example/x", "ftp:"),
    ] {
        let url = format!("https://cdn.example/r/{name}");
        let output = host.fetch(&[&url], dir.path());
        assert_eq!(output.status.code(), Some(1), "{name}");
        let stderr = stderr_of(&output);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(location) && stderr.contains(&format!("scheme {scheme}")),
            "{stderr}"
        );
        assert!(!stderr.contains("expired"), "{stderr}");
    }
    assert_eq!(
        host.get_lines(),
        ["GET /to-file.bin HTTP/1.1", "GET /to-ftp.bin HTTP/1.1"],
        "nothing fetched past the refused redirects, nothing retried"
    );

    let output = host.fetch(&["https://cdn.example/r/to-here.bin"], dir.path());
    assert!(output.status.success(), "{}", stderr_of(&output));
    assert_eq!(
        std::fs::read(dir.path().join("to-here.bin")).unwrap(),
        b"landed"
    );
    assert!(files_in(dir.path()) == ["to-here.bin"]);
}
