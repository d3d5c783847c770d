//! A cheap look at a job file before the YAML parser sees it: bounds its size and how deeply it nests.
//!
//! Why: the YAML scanner keeps one possible key per open flow collection and re-checks them all for every
//! token, so nesting costs time quadratic in its depth: 100,000 `[` in 200 KB took minutes. A job needs four
//! levels (the job, `constraints`, one constraint, its `in` list), so anything far deeper is a mistake or an
//! attack, and is refused in one linear pass over the text.
//!
//! The pass follows just enough YAML to count what the parser would count: flow brackets outside quoted
//! scalars, comments and block scalars; block collections by their indentation and by compact `- ` entries.
//! Where it cannot be exact it errs towards counting more, never less: a bracket it wrongly counts can at
//! worst refuse a file with dozens of unclosed brackets in odd places; a bracket it wrongly skipped could let
//! the quadratic case through.

/// The largest job file accepted. A job must fit one etcd request (1.5 MiB by default) once stored, so a
/// file several times that size is not a job file.
pub const MAX_FILE_BYTES: usize = 4 << 20;

/// The deepest nesting accepted (block and flow collections together).
pub const MAX_DEPTH: usize = 32;

/// Why the file was refused, and where (1-based line and column, in characters).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Refused {
    pub at: Option<(usize, usize)>,
    pub message: String,
}

pub(super) fn check(text: &str) -> Result<(), Refused> {
    if text.len() > MAX_FILE_BYTES {
        return Err(Refused {
            at: None,
            message: format!(
                "the file is {} bytes; a job file may be at most {} bytes ({} MiB), since the job must fit one etcd \
                 request once stored",
                text.len(),
                MAX_FILE_BYTES,
                MAX_FILE_BYTES >> 20
            ),
        });
    }
    let mut scan = Scan::default();
    for (index, line) in text.split('\n').enumerate() {
        scan.line(index + 1, line.strip_suffix('\r').unwrap_or(line))?;
    }
    Ok(())
}

/// A block scalar (`|` or `>`) being skipped: its lines are text, whatever they contain.
#[derive(Debug)]
struct BlockScalar {
    /// Column (0-based) of the collection entry that owns it; its text is indented further.
    owner: usize,
    /// The indentation of its text, once known (explicit indicator, or its first non-empty line).
    indent: Option<usize>,
}

#[derive(Debug, Default)]
struct Scan {
    /// Open flow collections (`[`, `{`).
    flow: usize,
    /// Columns (0-based) of the open block collections, innermost last.
    block: Vec<usize>,
    /// Inside a quoted scalar that continues on the next line.
    quote: Option<char>,
    block_scalar: Option<BlockScalar>,
    /// The next token may begin a node (so a quote, a bracket or `|` there is an indicator, not text).
    node_start: bool,
}

impl Scan {
    fn depth(&self) -> usize {
        self.block.len() + self.flow
    }

    fn too_deep(&self, line: usize, column: usize) -> Result<(), Refused> {
        if self.depth() <= MAX_DEPTH {
            return Ok(());
        }
        Err(Refused {
            at: Some((line, column + 1)),
            message: format!(
                "the file nests deeper than {MAX_DEPTH} levels here; a job file needs at most 4 (the job, \
                 `constraints`, one constraint, its list of values), and deeper files are refused before parsing"
            ),
        })
    }

    /// Opens a block collection at `column` (closing those at or right of it first).
    fn push_block(&mut self, line: usize, column: usize) -> Result<(), Refused> {
        while self.block.last().is_some_and(|&c| c >= column) {
            self.block.pop();
        }
        self.block.push(column);
        self.too_deep(line, column)
    }

    fn line(&mut self, number: usize, line: &str) -> Result<(), Refused> {
        let chars: Vec<char> = line.chars().collect();
        let indent = chars.iter().take_while(|&&c| c == ' ').count();
        let blank = chars[indent..].iter().all(|c| c.is_whitespace());
        if let Some(scalar) = &mut self.block_scalar {
            if blank {
                return Ok(());
            }
            match scalar.indent {
                Some(text) if indent >= text => return Ok(()),
                None if indent > scalar.owner => {
                    scalar.indent = Some(indent);
                    return Ok(());
                }
                _ => self.block_scalar = None,
            }
        }
        let mut i = 0;
        if self.quote.is_none() && self.flow == 0 {
            if blank || chars.get(indent) == Some(&'#') || (indent == 0 && chars.first() == Some(&'%')) {
                return Ok(());
            }
            i = indent;
            if indent == 0 && (starts_marker(&chars, "---") || starts_marker(&chars, "...")) {
                // A new document: nothing of the previous one stays open.
                self.block.clear();
                i = 3;
            } else {
                self.push_block(number, indent)?;
            }
            self.node_start = true;
        }
        self.tokens(number, &chars, i)
    }

    /// Scans the rest of a line from `i`.
    fn tokens(&mut self, number: usize, chars: &[char], mut i: usize) -> Result<(), Refused> {
        // Whether the previous character was a blank (or the line start): a `#` there begins a comment.
        let mut after_blank = i == 0 || chars.get(i.wrapping_sub(1)).is_some_and(|c| c.is_whitespace());
        // A compact entry (`- `, `? `) opens a collection at the column of whatever follows it.
        let mut open_at_next = false;
        while i < chars.len() {
            let c = chars[i];
            if let Some(quote) = self.quote {
                let Some(end) = close_quote(chars, i, quote) else { return Ok(()) };
                self.quote = None;
                self.node_start = false;
                after_blank = false;
                i = end;
                continue;
            }
            if c == ' ' || c == '\t' {
                after_blank = true;
                i += 1;
                continue;
            }
            if c == '#' && after_blank {
                return Ok(());
            }
            after_blank = false;
            if open_at_next {
                open_at_next = false;
                self.push_block(number, i)?;
            }
            let next = chars.get(i + 1).copied();
            let next_is_blank = next.is_none_or(|n| n == ' ' || n == '\t');
            let block = self.flow == 0;
            if self.node_start {
                match c {
                    '"' | '\'' => {
                        self.quote = Some(c);
                        i += 1;
                        continue;
                    }
                    '[' | '{' => {
                        self.flow += 1;
                        self.too_deep(number, i)?;
                        i += 1;
                        continue;
                    }
                    '&' | '!' => {
                        // An anchor or a tag: a property, after which the node itself may still begin.
                        i = skip_property(chars, i, block);
                        continue;
                    }
                    '-' | '?' if block && next_is_blank => {
                        open_at_next = true;
                        i += 1;
                        continue;
                    }
                    '|' | '>' if block => {
                        let owner = self.block.last().copied().unwrap_or(0);
                        let explicit = chars[i + 1..]
                            .iter()
                            .take_while(|c| c.is_ascii_digit() || **c == '+' || **c == '-')
                            .find_map(|c| c.to_digit(10))
                            .map(|d| owner + d as usize);
                        self.block_scalar = Some(BlockScalar { owner, indent: explicit });
                        self.node_start = false;
                        return Ok(());
                    }
                    _ => self.node_start = false,
                }
            }
            match c {
                '[' | '{' if !block => {
                    self.flow += 1;
                    self.too_deep(number, i)?;
                    self.node_start = true;
                }
                ']' | '}' if !block => {
                    self.flow -= 1;
                    self.node_start = false;
                }
                ',' if !block => self.node_start = true,
                ':' if next_is_blank || (!block && next.is_some_and(|n| ",[]{}".contains(n))) => {
                    self.node_start = true;
                }
                _ => {}
            }
            i += 1;
        }
        Ok(())
    }
}

/// Whether the line starts with the document marker `marker` followed by a blank or its end.
fn starts_marker(chars: &[char], marker: &str) -> bool {
    let m: Vec<char> = marker.chars().collect();
    chars.starts_with(&m) && chars.get(3).is_none_or(|c| c.is_whitespace())
}

/// From inside a quoted scalar (just after its opening quote, or at the start of a continuation line), the
/// index just past its closing quote; `None` if it continues on the next line.
fn close_quote(chars: &[char], start: usize, quote: char) -> Option<usize> {
    let mut i = start;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote == '"' => i += 2,
            '\'' if quote == '\'' && chars.get(i + 1) == Some(&'\'') => i += 2,
            c if c == quote => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// Past an anchor (`&name`) or a tag (`!tag`, `!<verbatim>`).
fn skip_property(chars: &[char], start: usize, block: bool) -> usize {
    let mut i = start + 1;
    if chars[start] == '!' && chars.get(i) == Some(&'<') {
        while i < chars.len() && chars[i] != '>' {
            i += 1;
        }
        return (i + 1).min(chars.len());
    }
    while i < chars.len() && !chars[i].is_whitespace() && (block || !",[]{}".contains(chars[i])) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_error(text: &str) -> Option<(usize, usize)> {
        match check(text) {
            Ok(()) => None,
            Err(r) => Some(r.at.expect("a depth error has a position")),
        }
    }

    #[test]
    fn ordinary_files_pass() {
        for text in [
            "name: web\nkind: service\nreplicas: 3\nresources: {cpu: 500m, memory: 512Mi}\nimage: busybox\n",
            "constraints:\n  - {label: zone, in: [a, b]}\n  - label: disk\n    not_in: [hdd]\n",
            "args: |\n  [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n  x\nname: a\n",
            "args: ['[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[', \"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\\"[[\"]\n",
            "command: echo [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n",
            "# [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\nname: a # [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n",
            "env: {A: 'it''s [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[', B: x}\n",
            "args: >2\n  [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n   [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n",
            "a: \"multi\n  line [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n  end\"\n",
        ] {
            assert_eq!(check(text), Ok(()), "{text}");
        }
        let nested_ok = format!("a: {}{}\n", "[".repeat(MAX_DEPTH - 1), "]".repeat(MAX_DEPTH - 1));
        assert_eq!(check(&nested_ok), Ok(()));
    }

    #[test]
    fn deep_flow_nesting_is_refused_where_it_goes_too_deep() {
        let text = format!("name: web\nargs: {}\n", "[".repeat(100_000));
        // The top-level mapping is one level, so the 32nd bracket is the 33rd level.
        assert_eq!(depth_error(&text), Some((2, 7 + MAX_DEPTH - 1)));
        let text = format!("a:\n  {}\n", "{a: ".repeat(50));
        assert!(depth_error(&text).is_some());
        // Brackets that only look closed inside a quote do not hide real ones.
        let text = format!("a: ['x]]]]]]]]', {}\n", "[".repeat(40));
        assert!(depth_error(&text).is_some());
        // Nor does a quote inside a plain scalar, which is an apostrophe, not a quote.
        let text = format!("a: it's\nb: {}\n", "[".repeat(40));
        assert_eq!(depth_error(&text), Some((2, 4 + MAX_DEPTH - 1)));
        // A block scalar ends where its indentation does.
        let text = format!("a: |\n    x\n  {}\n", "[".repeat(40));
        assert!(depth_error(&text).is_some());
        let text = format!("a: |\nb: {}\n", "[".repeat(40));
        assert!(depth_error(&text).is_some());
    }

    #[test]
    fn deep_block_nesting_is_refused() {
        let text = format!("args:\n{}x\n", "- ".repeat(100_000));
        assert_eq!(depth_error(&text).map(|(l, _)| l), Some(2));
        let mut text = String::new();
        for level in 0..40 {
            text.push_str(&format!("{}k{level}:\n", " ".repeat(level)));
        }
        assert_eq!(depth_error(&text), Some((MAX_DEPTH + 1, MAX_DEPTH + 1)));
    }

    #[test]
    fn size_is_bounded() {
        let text = format!("name: a\n#{}\n", "x".repeat(MAX_FILE_BYTES));
        let refused = check(&text).unwrap_err();
        assert!(refused.at.is_none() && refused.message.contains("at most 4194304 bytes"), "{refused:?}");
    }
}
