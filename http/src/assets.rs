//! The web page, embedded in the binary: no build step, no CDN.

pub const INDEX: &str = include_str!("../assets/index.html");
pub const COMMISSION: &str = include_str!("../assets/commission.html");
/// The page that asks before a sign-in link switches the browser to another account; its
/// `{current}`, `{next}`, `{token}` and `{here}` are filled in (escaped) when it is served.
pub const SWITCH: &str = include_str!("../assets/switch.html");
pub const APP_JS: &str = include_str!("../assets/app.js");
pub const STYLE_CSS: &str = include_str!("../assets/style.css");
