//! `crm`: the whole CRM suite in one binary (see the library for its commands).

fn main() -> anyhow::Result<()> {
    crm::main()
}
