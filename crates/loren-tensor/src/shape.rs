use std::fmt;

/// The dimensions of a row-major, contiguous tensor.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    pub fn new(dims: impl Into<Vec<usize>>) -> Self {
        Shape(dims.into())
    }

    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    pub fn rank(&self) -> usize {
        self.0.len()
    }

    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }

    /// Size of dimension `i`, counting from the end when negative.
    pub fn dim(&self, i: isize) -> usize {
        let idx = if i < 0 { self.0.len() as isize + i } else { i };
        self.0[idx as usize]
    }

    /// The group axis: dimension 0.
    pub fn groups(&self) -> usize {
        self.0.first().copied().unwrap_or(1)
    }

    /// The feature axis: the last dimension.
    pub fn last(&self) -> usize {
        self.0.last().copied().unwrap_or(1)
    }

    /// Rows per group: the product of all dimensions between the group and feature axes.
    pub fn rows_per_group(&self) -> usize {
        match self.0.len() {
            0 | 1 => 1,
            n => self.0[1..n - 1].iter().product(),
        }
    }

    /// The same shape with dimension 0 replaced.
    pub fn with_groups(&self, g: usize) -> Shape {
        let mut d = self.0.clone();
        if let Some(first) = d.first_mut() {
            *first = g;
        }
        Shape(d)
    }

    /// The same shape with the last dimension replaced.
    pub fn with_last(&self, n: usize) -> Shape {
        let mut d = self.0.clone();
        if let Some(last) = d.last_mut() {
            *last = n;
        }
        Shape(d)
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(d.to_vec())
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Shape(d.to_vec())
    }
}

impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        Shape(d)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
