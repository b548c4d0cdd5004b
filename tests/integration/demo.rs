//! `fly demo`: the whole loop offline, with no token and no configuration.

use crate::common::{fly, stderr_of};

#[test]
fn demo_plays_the_conversation_and_prints_the_transcript() {
    let home = tempfile::tempdir().unwrap();
    let output = fly().env("HOME", home.path()).arg("demo").output().unwrap();
    assert!(output.status.success(), "{}", stderr_of(&output));
    let transcript = String::from_utf8(output.stdout.clone()).unwrap();
    for expected in [
        "alice (private u_alice)  › hello fly 👋",
        "bot → u_alice            ‹ echo: hello fly 👋",
        "bot → g_team             ‹ echo: 大家好，部署完成了吗？",
        "‹ [image] forwarded back after saving 3-cat.png (48000 bytes), 3-thumb-cat.png (4000 bytes)",
        "3 updates handled",
        // The hint ends with how to write to the bot without curl.
        "fly emulator say --chat u_me \"hello bot\"",
    ] {
        assert!(
            transcript.contains(expected),
            "missing {expected:?} in:\n{transcript}"
        );
    }
    assert!(!transcript.contains("(no reply)"), "{transcript}");
    assert!(output.stderr.is_empty(), "{}", stderr_of(&output));
    // The demo keeps its state in a temporary directory, not under HOME.
    assert_eq!(std::fs::read_dir(home.path()).unwrap().count(), 0);
}
