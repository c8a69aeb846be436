//! Normalisation for duplicate protection (SPEC C3): phones to E.164, e-mails lower-cased,
//! company names without case, punctuation or legal form.

/// Why a phone number was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhoneError {
    Empty,
    BadCharacter,
    NeedsCountryCode,
    BadLength,
}

impl PhoneError {
    pub fn describe(self) -> &'static str {
        match self {
            PhoneError::Empty => "is required",
            PhoneError::BadCharacter => "may hold only digits, spaces, '+', '-', '.', '/', '(' and ')'",
            PhoneError::NeedsCountryCode => {
                "needs a country code (\"+49 30 1234567\"); or start the service with --default-calling-code"
            }
            PhoneError::BadLength => "must have 7 to 15 digits including the country code (E.164)",
        }
    }
}

/// The national trunk prefix dialled before an area code, by country calling code.
fn trunk_prefix(calling_code: &str) -> &'static str {
    match calling_code {
        "7" => "8",
        "1" => "1",
        _ => "0",
    }
}

/// Normalises a phone number to E.164 ("+74951234567"). National numbers get
/// `default_calling_code` (digits, e.g. "7"); without one they are refused.
pub fn phone_e164(input: &str, default_calling_code: &str) -> Result<String, PhoneError> {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(PhoneError::Empty);
    }
    let mut digits = String::with_capacity(trimmed.len());
    let mut international = false;
    for (i, c) in trimmed.chars().enumerate() {
        match c {
            '0'..='9' => digits.push(c),
            '+' if i == 0 => international = true,
            ' ' | '-' | '.' | '/' | '(' | ')' | '\u{a0}' => {}
            _ => return Err(PhoneError::BadCharacter),
        }
    }
    if !international && digits.starts_with("00") {
        international = true;
        digits.drain(..2);
    }
    let full = if international {
        digits
    } else {
        if default_calling_code.is_empty() {
            return Err(PhoneError::NeedsCountryCode);
        }
        let national = digits.strip_prefix(trunk_prefix(default_calling_code)).unwrap_or(&digits);
        format!("{default_calling_code}{national}")
    };
    if !(7..=15).contains(&full.len()) || full.starts_with('0') {
        return Err(PhoneError::BadLength);
    }
    Ok(format!("+{full}"))
}

/// Legal forms dropped from company names before comparison.
const LEGAL_FORMS: &[&str] = &[
    "llc",
    "inc",
    "incorporated",
    "ltd",
    "limited",
    "co",
    "corp",
    "corporation",
    "company",
    "plc",
    "gmbh",
    "ag",
    "sa",
    "sas",
    "srl",
    "bv",
    "nv",
    "oy",
    "ab",
    "as",
    "pte",
    "pty",
    "kk",
    "ooo",
    "ооо",
    "зао",
    "оао",
    "пао",
    "ао",
    "ип",
    "тоо",
    "corp.",
    "有限公司",
    "股份有限公司",
    "有限责任公司",
    "集团",
];

/// The comparison form of a company name: "ООО «Ромашка»" and "ромашка" are the same company,
/// as are "Acme, Inc." and "ACME".
pub fn company_name(input: &str) -> String {
    let mut cleaned = input.to_lowercase();
    for suffix in ["股份有限公司", "有限责任公司", "有限公司", "集团"] {
        if let Some(stripped) = cleaned.trim_end().strip_suffix(suffix) {
            cleaned = stripped.to_string();
        }
    }
    let spaced: String = cleaned.chars().map(|c| if c.is_alphanumeric() { c } else { ' ' }).collect();
    let words: Vec<&str> = spaced.split_whitespace().filter(|w| !LEGAL_FORMS.contains(w)).collect();
    if words.is_empty() { spaced.split_whitespace().collect::<Vec<_>>().join(" ") } else { words.join(" ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_become_e164() {
        assert_eq!(phone_e164("+7 (495) 123-45-67", "").unwrap(), "+74951234567");
        assert_eq!(phone_e164("0049 30 1234567", "").unwrap(), "+49301234567");
        assert_eq!(phone_e164("8 495 123 45 67", "7").unwrap(), "+74951234567");
        assert_eq!(phone_e164("030 1234567", "49").unwrap(), "+49301234567");
        assert_eq!(phone_e164("(415) 555-0100", "1").unwrap(), "+14155550100");
        assert_eq!(phone_e164("0917 123 4567", "63").unwrap(), "+639171234567");
    }

    #[test]
    fn phones_are_refused_clearly() {
        assert_eq!(phone_e164("", "7"), Err(PhoneError::Empty));
        assert_eq!(phone_e164("call me", "7"), Err(PhoneError::BadCharacter));
        assert_eq!(phone_e164("+1 555 CALL", ""), Err(PhoneError::BadCharacter));
        assert_eq!(phone_e164("495 123 45 67", ""), Err(PhoneError::NeedsCountryCode));
        assert_eq!(phone_e164("+12", ""), Err(PhoneError::BadLength));
        assert_eq!(phone_e164("+1234567890123456", ""), Err(PhoneError::BadLength));
        assert_eq!(phone_e164("1+2", ""), Err(PhoneError::BadCharacter));
    }

    #[test]
    fn company_names_compare_without_form_or_punctuation() {
        assert_eq!(company_name("ООО «Ромашка»"), "ромашка");
        assert_eq!(company_name("Acme, Inc."), "acme");
        assert_eq!(company_name("ACME"), "acme");
        assert_eq!(company_name("  Blue   Sky  Ltd "), "blue sky");
        assert_eq!(company_name("深圳腾飞科技有限公司"), "深圳腾飞科技");
        assert_eq!(company_name("LLC"), "llc");
    }
}
