//! Which fields of a media message hold media URLs (SPEC section 1). The one
//! place this rule lives: poll-echo, serve-webhook and fetch-media share it.

use fly_signature::json::Value;

/// Message types that carry media.
pub const MEDIA_TYPES: [&str; 4] = ["image", "voice", "video", "file"];

/// A media URL and the field of `data` it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaUrl {
    pub field: &'static str,
    pub url: String,
    /// A preview (`thumbnailUrl`) rather than the media itself.
    pub is_thumbnail: bool,
}

pub fn is_media_type(msg_type: &str) -> bool {
    MEDIA_TYPES.contains(&msg_type)
}

/// The fields of a message's `data` that hold its media URLs, the media
/// itself first, then its preview: image `originalUrl`, `thumbnailUrl`;
/// voice/file `url`; video `videoUrl`, `thumbnailUrl`; none for other types.
pub fn media_fields(msg_type: &str) -> &'static [&'static str] {
    match msg_type {
        "image" => &["originalUrl", "thumbnailUrl"],
        "voice" | "file" => &["url"],
        "video" => &["videoUrl", "thumbnailUrl"],
        _ => &[],
    }
}

/// The media URLs of a message's `data`, in the examples' order: image
/// `originalUrl`, `thumbnailUrl`; voice/file `url`; video `videoUrl`,
/// `thumbnailUrl`. Blank or non-string fields are skipped, and so are strings
/// no URL can be (a lone surrogate); URLs are trimmed. `data` is the message's
/// `data` as the Python-compatible reader parsed it.
pub fn media_urls(msg_type: &str, data: &Value) -> Vec<MediaUrl> {
    media_fields(msg_type)
        .iter()
        .filter_map(|&field| {
            let Value::Str(url) = data.get(field)? else {
                return None;
            };
            let url = std::str::from_utf8(url).ok()?.trim();
            (!url.is_empty()).then(|| MediaUrl {
                field,
                url: url.to_string(),
                is_thumbnail: field == "thumbnailUrl",
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fly_signature::json::parse;

    fn urls(msg_type: &str, data: &str) -> Vec<(&'static str, String)> {
        media_urls(msg_type, &parse(data).unwrap())
            .into_iter()
            .map(|media| (media.field, media.url))
            .collect()
    }

    #[test]
    fn each_type_has_its_fields() {
        let all = r#"{"originalUrl": "o", "thumbnailUrl": " t ", "url": "u", "videoUrl": "v"}"#;
        let table: [(&str, Vec<(&str, &str)>); 6] = [
            ("image", vec![("originalUrl", "o"), ("thumbnailUrl", "t")]),
            ("voice", vec![("url", "u")]),
            ("file", vec![("url", "u")]),
            ("video", vec![("videoUrl", "v"), ("thumbnailUrl", "t")]),
            ("text", vec![]),
            ("sticker", vec![]),
        ];
        for (msg_type, expected) in table {
            let expected: Vec<(&str, String)> = expected
                .into_iter()
                .map(|(f, u)| (f, u.to_string()))
                .collect();
            assert_eq!(urls(msg_type, all), expected, "{msg_type}");
        }
    }

    #[test]
    fn blank_and_non_string_urls_are_skipped() {
        assert!(urls("image", r#"{"originalUrl": "  ", "thumbnailUrl": 5}"#).is_empty());
        assert!(urls("file", r#"{"url": "\ud800"}"#).is_empty());
    }
}
