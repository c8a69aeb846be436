//! Text search (SPEC C5): what a query looks for. Every term must match, by substring, in any
//! case, somewhere in a record's names, e-mails, phones, handles, company role or industry and
//! region.
//!
//! Phones are stored (and searched) in E.164, so a run of words that looks like a phone number
//! — `+7 957 100-00-10`, `957 100-00-10`, `00-10` — is one term of its digits, however it was
//! typed, looked for in the record's phone numbers only (their own index). A whole number
//! typed with the national trunk prefix or `00` (`8 957 100-00-10` with calling code 7) also
//! matches as the E.164 number it stands for.

use super::{Rules, normalize};

/// Most terms a query is searched for; words beyond them are ignored.
pub const MAX_TERMS: usize = 8;

/// One term of a query: it matches when any of its forms occurs — lower-cased text in a
/// record's text, or (for a `phone` term) digits in its phone numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    pub forms: Vec<String>,
    pub phone: bool,
}

fn phone_like(word: &str) -> bool {
    let body = word.strip_prefix('+').unwrap_or(word);
    body.chars().any(|c| c.is_ascii_digit())
        && body.chars().all(|c| c.is_ascii_digit() || matches!(c, '-' | '(' | ')' | '.' | '/'))
}

/// The terms of `query`; empty when there is nothing to search for.
pub fn terms(query: &str, rules: &Rules) -> Vec<Term> {
    let mut terms = Vec::new();
    let mut run: Vec<&str> = Vec::new();
    for word in query.split_whitespace() {
        if phone_like(word) {
            // A '+' starts a new number.
            if word.starts_with('+') && !run.is_empty() {
                terms.push(phone_term(&run, rules));
                run.clear();
            }
            run.push(word);
            continue;
        }
        if !run.is_empty() {
            terms.push(phone_term(&run, rules));
            run.clear();
        }
        terms.push(Term { forms: vec![word.to_lowercase()], phone: false });
    }
    if !run.is_empty() {
        terms.push(phone_term(&run, rules));
    }
    terms.truncate(MAX_TERMS);
    terms
}

/// The digits of a phone-like run, and the E.164 number it stands for when it was typed with a
/// trunk prefix or `00`.
fn phone_term(run: &[&str], rules: &Rules) -> Term {
    let typed = run.join(" ");
    let digits: String = typed.chars().filter(char::is_ascii_digit).collect();
    let mut forms = vec![digits.clone()];
    if !typed.starts_with('+')
        && let Ok(e164) = normalize::phone_e164(&typed, &rules.default_calling_code)
    {
        let e164 = e164.trim_start_matches('+').to_string();
        // Where the number contains what was typed, the typed digits already find it.
        if !e164.contains(&digits) {
            forms.push(e164);
        }
    }
    Term { forms, phone: true }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forms(query: &str) -> Vec<Vec<String>> {
        terms(query, &Rules { default_calling_code: "7".into() }).into_iter().map(|t| t.forms).collect()
    }

    #[test]
    fn numbers_are_phone_terms() {
        let kinds: Vec<bool> = terms("anna +7 957 100-00-10", &Rules::default()).into_iter().map(|t| t.phone).collect();
        assert_eq!(kinds, [false, true]);
    }

    #[test]
    fn words_are_lower_cased_terms() {
        assert_eq!(forms("Anna  PETROVA"), [vec!["anna".to_string()], vec!["petrova".to_string()]]);
        assert!(forms("   ").is_empty());
        assert_eq!(forms(&"w ".repeat(20)).len(), MAX_TERMS);
    }

    #[test]
    fn phones_match_however_they_are_typed() {
        assert_eq!(forms("+7 957 100-00-10"), [vec!["79571000010".to_string()]]);
        assert_eq!(forms("957 100-00-10"), [vec!["9571000010".to_string()]]);
        assert_eq!(forms("00-10"), [vec!["0010".to_string()]]);
        assert_eq!(forms("(957) 100.00.10"), [vec!["9571000010".to_string()]]);
        // The trunk prefix 8 (calling code 7) and the international 00 stand for +7.
        assert_eq!(forms("8 957 100-00-10"), [vec!["89571000010".to_string(), "79571000010".to_string()]]);
        assert_eq!(forms("0079571000010"), [vec!["0079571000010".to_string(), "79571000010".to_string()]]);
        // A name next to a number, and two numbers.
        assert_eq!(forms("anna 100-00-10"), [vec!["anna".to_string()], vec!["1000010".to_string()]]);
        assert_eq!(forms("+7 957 +49 30"), [vec!["7957".to_string()], vec!["4930".to_string()]]);
        // Words with letters stay words.
        assert_eq!(forms("anna2024@example.com"), [vec!["anna2024@example.com".to_string()]]);
    }
}
