//! `fly fetch-media` against the emulator: exact bytes to files and pipes,
//! URLs from updates, failures named, nothing partial left behind, flat memory.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::common::{
    Emulator, TOKEN, fly_at, fly_child, fly_path, media_pattern, stderr_of, wait_for_exit,
    wait_until,
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
        stderr_of(&again).contains("already exists"),
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

#[test]
fn an_expired_access_url_is_exit_1_and_leaves_no_file() {
    let emulator = Emulator::start();
    register(&emulator, "https://cdn.example/soon-gone.bin", 100);
    let dir = tempfile::tempdir().unwrap();
    let output = fly_at(&emulator)
        .args(["fetch-media", "--expire-seconds", "0", "--dir"])
        .arg(dir.path())
        .arg("https://cdn.example/soon-gone.bin")
        .output()
        .unwrap();
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
