//! UTC calendar dates for daily file names and report ranges, without a
//! time-zone library: the proleptic Gregorian calendar over days since the
//! Unix epoch.

/// Microseconds in one UTC day (leap seconds are not counted, as in Unix
/// time).
pub const DAY_US: u64 = 86_400_000_000;

/// A UTC calendar date.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date {
    pub year: i32,
    pub month: u32,
    pub day: u32,
}

impl Date {
    /// Converts days since 1970-01-01 to a date. The algorithm shifts the
    /// year to start in March so that the leap day falls at its end, then
    /// splits days into 400-year eras of 146,097 days.
    pub fn from_days(days: i64) -> Date {
        let shifted = days + 719_468;
        let era = shifted.div_euclid(146_097);
        let day_of_era = shifted.rem_euclid(146_097);
        let year_of_era =
            (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
        let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
        let month_from_march = (5 * day_of_year + 2) / 153;
        let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
        let month = if month_from_march < 10 {
            month_from_march + 3
        } else {
            month_from_march - 9
        } as u32;
        let year = year_of_era + era * 400 + i64::from(month <= 2);
        Date {
            year: year as i32,
            month,
            day,
        }
    }

    /// Converts the date to days since 1970-01-01; the inverse of
    /// [`Date::from_days`].
    pub fn to_days(self) -> i64 {
        let year = i64::from(self.year) - i64::from(self.month <= 2);
        let era = year.div_euclid(400);
        let year_of_era = year.rem_euclid(400);
        let month = i64::from(self.month);
        let month_from_march = if month > 2 { month - 3 } else { month + 9 };
        let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(self.day) - 1;
        let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
        era * 146_097 + day_of_era - 719_468
    }

    /// The UTC date of a time in microseconds since the epoch.
    pub fn from_unix_us(at_us: u64) -> Date {
        Date::from_days((at_us / DAY_US) as i64)
    }

    /// Parses `YYYY-MM-DD` (with dashes) or `YYYYMMDD` (file names).
    pub fn parse(text: &str) -> Option<Date> {
        let digits: String = text.chars().filter(|c| *c != '-').collect();
        let dashed = text.len() == 10 && text.as_bytes()[4] == b'-' && text.as_bytes()[7] == b'-';
        if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        if text.len() != 8 && !dashed {
            return None;
        }
        let year: i32 = digits[0..4].parse().ok()?;
        let month: u32 = digits[4..6].parse().ok()?;
        let day: u32 = digits[6..8].parse().ok()?;
        let date = Date { year, month, day };
        // A day such as 02-30 does not survive the round trip.
        (Date::from_days(date.to_days()) == date).then_some(date)
    }

    /// `YYYYMMDD`, as used in file names.
    pub fn compact(self) -> String {
        format!("{:04}{:02}{:02}", self.year, self.month, self.day)
    }
}

impl std::fmt::Display for Date {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

/// Formats microseconds since the epoch as RFC 3339 UTC with microseconds.
pub fn rfc3339_us(at_us: u64) -> String {
    let date = Date::from_unix_us(at_us);
    let within_day_us = at_us % DAY_US;
    let seconds = within_day_us / 1_000_000;
    format!(
        "{date}T{:02}:{:02}:{:02}.{:06}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60,
        within_day_us % 1_000_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_and_known_dates() {
        assert_eq!(Date::from_days(0).to_string(), "1970-01-01");
        assert_eq!(Date::from_days(11_016).to_string(), "2000-02-29");
        assert_eq!(Date::from_days(20_791).to_string(), "2026-12-04");
        assert_eq!(Date::from_days(-1).to_string(), "1969-12-31");
    }

    #[test]
    fn days_round_trip() {
        for days in -800_000..800_000 {
            assert_eq!(Date::from_days(days).to_days(), days);
        }
    }

    #[test]
    fn parse_rejects_invalid_dates() {
        assert_eq!(Date::parse("2026-12-04").map(Date::to_days), Some(20_791));
        assert_eq!(Date::parse("20261204").map(Date::to_days), Some(20_791));
        assert!(Date::parse("2026-02-30").is_none());
        assert!(Date::parse("2026-13-01").is_none());
        assert!(Date::parse("2026-1-011").is_none());
        assert!(Date::parse("2026/12/04").is_none());
        assert!(Date::parse("").is_none());
    }

    #[test]
    fn rfc3339_formats_microseconds() {
        assert_eq!(
            rfc3339_us(20_791 * DAY_US + 3_723_000_042),
            "2026-12-04T01:02:03.000042Z"
        );
    }
}
