roulette-intro = أدر العجلة واربح خصمًا! { $spins_left ->
    [0] لم تتبق لديك أي محاولات.
    [one] لديك محاولة واحدة.
    [two] لديك محاولتان.
    [few] لديك { $spins_left } محاولات.
    [many] لديك { $spins_left } محاولة.
   *[other] لديك { $spins_left } محاولة.
}
roulette-btn-spin = أدر!
roulette-btn-again = مرة أخرى
roulette-btn-claim = احصل على رمزي
roulette-prize-10 = خصم 10%
roulette-prize-25 = خصم 25%
roulette-prize-shipping = شحن مجاني
roulette-prize-nothing = لا شيء هذه المرة
roulette-won = لقد ربحت { $prize_label }! اضغط الزر للحصول على رمزك.
roulette-code = رمزك: { $prize_code }. استخدمه عند الدفع.
roulette-already-won = لقد ربحت بالفعل { $prize_label }. رمزك: { $prize_code }. جائزة واحدة لكل عميل، شكرًا لمشاركتك!
roulette-lost = ليس هذه المرة. حاول مجددًا!
roulette-no-spins = لقد استخدمت كل محاولاتك. ادعُ صديقًا لتحصل على محاولة أخرى: https://t.me/ExampleShopBot?start={ $referral_ref }
roulette-out = عذرًا، نفدت الجوائز. شكرًا لمشاركتك!
